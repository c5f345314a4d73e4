//! The tokenizer of a model folder, through the `tokenizers` crate: `tokenizer.json`, or
//! GPT-2's older pair `vocab.json` + `merges.txt` (read as transformers' `GPT2TokenizerFast`
//! converts them: byte-level BPE, no prefix space unless `tokenizer_config.json` asks).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A Hugging Face tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({})", self.path.display())
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let text = crate::io::read_text(path)?;
        Tokenizer::from_json(text.as_bytes(), path)
    }

    fn from_json(bytes: &[u8], path: &Path) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The files a model folder's tokenizer is read from: `tokenizer.json`, else
    /// `vocab.json` and `merges.txt` (with `tokenizer_config.json` when present); empty when
    /// the folder has no tokenizer.
    pub fn files(dir: &Path) -> Vec<PathBuf> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return vec![json];
        }
        let mut v: Vec<PathBuf> = ["vocab.json", "merges.txt", "tokenizer_config.json"]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .collect();
        if !v.iter().any(|p| p.ends_with("vocab.json")) {
            v.clear();
        }
        v
    }

    /// Loads the tokenizer of a model folder if it has one: `tokenizer.json`, else
    /// `vocab.json` + `merges.txt`.
    pub fn load_optional(dir: &Path) -> Result<Option<Tokenizer>> {
        let p = dir.join("tokenizer.json");
        if p.exists() {
            return Tokenizer::load(&p).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        match (vocab.exists(), merges.exists()) {
            (true, true) => Tokenizer::from_vocab_merges(&vocab, &merges).map(Some),
            (true, false) => Err(Error::Format {
                path: merges,
                msg: "missing: vocab.json is there, but a byte-level BPE also needs merges.txt (or give tokenizer.json)".into(),
            }),
            (false, true) => Err(Error::Format {
                path: vocab,
                msg: "missing: merges.txt is there, but a byte-level BPE also needs vocab.json (or give tokenizer.json)".into(),
            }),
            (false, false) => Ok(None),
        }
    }

    /// Loads the tokenizer of a model folder (if any) and checks it against the model's
    /// vocabulary: it must have tokens, and every id must be below `vocab_size`.
    pub fn for_model(dir: &Path, vocab_size: usize) -> Result<Option<Tokenizer>> {
        let Some(t) = Tokenizer::load_optional(dir)? else {
            return Ok(None);
        };
        let vocab = t.inner.get_vocab(true);
        let config = dir.join("config.json");
        match vocab.values().max() {
            None => Err(Error::Format {
                path: t.path.clone(),
                msg: "the tokenizer's vocabulary is empty".into(),
            }),
            Some(&max) if max as usize >= vocab_size => {
                let (token, _) = vocab
                    .iter()
                    .find(|(_, &id)| id == max)
                    .map_or(("?", 0), |(s, id)| (s.as_str(), *id));
                Err(Error::Format {
                    path: t.path.clone(),
                    msg: format!(
                        "the tokenizer has token id {max} ({token:?}; {} tokens in all), but {} says vocab_size = {vocab_size}: tokenizer and model do not belong together",
                        vocab.len(),
                        config.display()
                    ),
                })
            }
            Some(_) => Ok(Some(t)),
        }
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` and `merges.txt`, as transformers'
    /// `GPT2Converter` does: `add_prefix_space` from `tokenizer_config.json` (default false),
    /// byte-level decoding, and the special tokens of `tokenizer_config.json`'s
    /// `added_tokens_decoder` (else `<|endoftext|>` when the vocabulary has it).
    pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
        let vocab: Value =
            serde_json::from_str(&crate::io::read_text(vocab_path)?).map_err(|e| {
                Error::Format {
                    path: vocab_path.to_path_buf(),
                    msg: format!("not valid JSON: {e}"),
                }
            })?;
        let vocab = match vocab {
            Value::Object(m) => {
                for (tok, id) in &m {
                    if id.as_u64().and_then(|x| u32::try_from(x).ok()).is_none() {
                        return Err(Error::Format {
                            path: vocab_path.to_path_buf(),
                            msg: format!(
                                "token {tok:?} has id {id}, expected a non-negative integer"
                            ),
                        });
                    }
                }
                m
            }
            _ => {
                return Err(Error::Format {
                    path: vocab_path.to_path_buf(),
                    msg: "expected a JSON object {token: id}".into(),
                })
            }
        };
        let text = crate::io::read_text(merges_path)?;
        let mut merges = vec![];
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(Error::Format {
                    path: merges_path.to_path_buf(),
                    msg: format!(
                        "line {}: {line:?}, expected two tokens separated by one space",
                        i + 1
                    ),
                });
            }
            for p in &parts {
                if !vocab.contains_key(*p) {
                    return Err(Error::Format {
                        path: merges_path.to_path_buf(),
                        msg: format!("line {}: token {p:?} is not in vocab.json", i + 1),
                    });
                }
            }
            if !vocab.contains_key(&format!("{}{}", parts[0], parts[1])) {
                return Err(Error::Format {
                    path: merges_path.to_path_buf(),
                    msg: format!(
                        "line {}: the merge {:?} is not in vocab.json",
                        i + 1,
                        format!("{}{}", parts[0], parts[1])
                    ),
                });
            }
            merges.push(line.to_string());
        }
        let dir = vocab_path.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            serde_json::from_str(&crate::io::read_text(&config_path)?).map_err(|e| {
                Error::Format {
                    path: config_path.clone(),
                    msg: format!("not valid JSON: {e}"),
                }
            })?
        } else {
            Value::Null
        };
        let add_prefix_space = config
            .get("add_prefix_space")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut added = vec![];
        if let Some(m) = config
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
        {
            for (id, t) in m {
                let (Ok(id), Some(content)) =
                    (id.parse::<u32>(), t.get("content").and_then(Value::as_str))
                else {
                    return Err(Error::Format {
                        path: config_path.clone(),
                        msg: format!(
                            "added_tokens_decoder[{id:?}]: expected an id and a \"content\""
                        ),
                    });
                };
                let flag = |k: &str, d: bool| t.get(k).and_then(Value::as_bool).unwrap_or(d);
                added.push(json!({
                    "id": id, "content": content, "single_word": flag("single_word", false),
                    "lstrip": flag("lstrip", false), "rstrip": flag("rstrip", false),
                    "normalized": flag("normalized", false), "special": flag("special", true),
                }));
            }
        } else if let Some(id) = vocab.get("<|endoftext|>").and_then(Value::as_u64) {
            added.push(json!({
                "id": id, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            }));
        }
        let byte_level = |aps: bool, trim: bool| json!({"type": "ByteLevel", "add_prefix_space": aps, "trim_offsets": trim, "use_regex": true});
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level(add_prefix_space, true),
            "post_processor": byte_level(true, false),
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let bytes = serde_json::to_vec(&tj).unwrap_or_default();
        Tokenizer::from_json(&bytes, vocab_path).map_err(|e| match e {
            Error::Format { path, msg } => Error::Format {
                path,
                msg: format!("with {}: {msg}", merges_path.display()),
            },
            e => e,
        })
    }

    /// The file the tokenizer came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Format {
            path: self.path.clone(),
            msg: format!("cannot encode {text:?}: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token strings of `ids` (as the vocabulary spells them; `None` for an unknown id).
    pub fn tokens(&self, ids: &[u32]) -> Vec<Option<String>> {
        ids.iter().map(|&i| self.inner.id_to_token(i)).collect()
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Format {
            path: self.path.clone(),
            msg: format!("cannot decode {ids:?}: {e}"),
        })
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
