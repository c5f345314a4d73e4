//! The optional `tokenizer.json` of a model folder, through the `tokenizers` crate.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A Hugging Face tokenizer loaded from `tokenizer.json`.
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
        let inner =
            tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| Error::Format {
                path: path.to_path_buf(),
                msg: format!("not a tokenizer.json: {e}"),
            })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Loads `dir/tokenizer.json` if it exists.
    pub fn load_optional(dir: &Path) -> Result<Option<Tokenizer>> {
        let p = dir.join("tokenizer.json");
        if p.exists() {
            Tokenizer::load(&p).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Format {
            path: self.path.clone(),
            msg: format!("cannot encode {text:?}: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
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
