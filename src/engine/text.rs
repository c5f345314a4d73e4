//! The text of a completion: stop strings as a scheduler stop condition, the final text cut
//! before the first stop string, and the same text streamed piece by piece so that the pieces
//! always add up to the final text.

use super::scheduler::StopFn;
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use std::sync::Arc;

/// A stop condition that decodes the generated tokens after every step and fires when the
/// text contains one of `stops`; `None` when there are no stop strings.
pub fn stop_fn(tok: &Arc<Tokenizer>, stops: &[String]) -> Option<StopFn> {
    if stops.is_empty() {
        return None;
    }
    let t = Arc::clone(tok);
    let strings = stops.to_vec();
    Some(Box::new(move |ids: &[u32]| {
        t.decode(ids)
            .is_ok_and(|text| strings.iter().any(|s| text.contains(s.as_str())))
    }))
}

/// The text of the generated `ids` without a final `stop_id` token, cut before the first stop
/// string; `None` without a tokenizer.
pub fn completion_text(
    tok: Option<&Tokenizer>,
    ids: &[u32],
    stop_id: Option<u32>,
    stops: &[String],
) -> Result<Option<String>> {
    let shown = match ids.last() {
        Some(&l) if Some(l) == stop_id => &ids[..ids.len() - 1],
        _ => ids,
    };
    let Some(t) = tok else { return Ok(None) };
    let mut text = t.decode(shown)?;
    if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
    }
    Ok(Some(text))
}

/// The text of a running completion, handed out in pieces as tokens arrive.
///
/// A piece never holds text that could still change or be cut: a trailing incomplete UTF-8
/// sequence (decoded as U+FFFD until its last byte arrives) and a trailing part that could be
/// the start of a stop string are held back. So the pieces, followed by what
/// [`TextStream::finish`] returns, are exactly [`completion_text`] of the final ids.
pub struct TextStream {
    tok: Option<Arc<Tokenizer>>,
    stop_id: Option<u32>,
    stops: Vec<String>,
    ids: Vec<u32>,
    sent: String,
}

impl TextStream {
    /// A stream for one completion (`stop_id`: the end-of-sequence id, left out of the text).
    pub fn new(tok: Option<Arc<Tokenizer>>, stop_id: Option<u32>, stops: Vec<String>) -> Self {
        TextStream {
            tok,
            stop_id,
            stops,
            ids: Vec::new(),
            sent: String::new(),
        }
    }

    /// Adds newly generated tokens; returns the text that is now certain (possibly empty).
    pub fn push(&mut self, new_ids: &[u32]) -> Result<String> {
        self.ids.extend_from_slice(new_ids);
        let Some(t) = &self.tok else {
            return Ok(String::new());
        };
        let full = t.decode(&self.ids)?;
        let settled = full.trim_end_matches('\u{FFFD}');
        let keep = settled.len() - held_back(settled, &self.stops);
        let settled = &settled[..keep];
        if settled.len() <= self.sent.len() || !settled.starts_with(self.sent.as_str()) {
            return Ok(String::new());
        }
        let piece = settled[self.sent.len()..].to_string();
        self.sent.push_str(&piece);
        Ok(piece)
    }

    /// The rest of the text once the completion has ended with `ids` (all its tokens).
    pub fn finish(&mut self, ids: &[u32]) -> Result<String> {
        let text = completion_text(self.tok.as_deref(), ids, self.stop_id, &self.stops)?
            .unwrap_or_default();
        let rest = text
            .strip_prefix(self.sent.as_str())
            .unwrap_or_default()
            .to_string();
        self.ids = ids.to_vec();
        self.sent.push_str(&rest);
        Ok(rest)
    }

    /// The text handed out so far.
    pub fn sent(&self) -> &str {
        &self.sent
    }
}

/// Bytes at the end of `text` that could be the start of a stop string (the longest such
/// suffix; it starts on a character boundary because it equals a stop string's prefix).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        // Proper prefixes only: a whole stop string would have ended the completion.
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_strings_start_is_held_back() {
        let stops = vec!["abc".to_string(), "é!".to_string()];
        assert_eq!(held_back("xxab", &stops), 2);
        assert_eq!(held_back("xxa", &stops), 1);
        assert_eq!(
            held_back("xxabc", &stops),
            0,
            "a whole stop string is not a start"
        );
        assert_eq!(held_back("xé", &stops), "é".len());
        assert_eq!(held_back("xyz", &stops), 0);
        assert_eq!(held_back("", &stops), 0);
    }
}
