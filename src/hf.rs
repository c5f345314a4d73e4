//! What a Hugging Face model folder holds besides its config, for any model family: where
//! the weights are (one `model.safetensors`, or the shards `model.safetensors.index.json`
//! names, as `save_pretrained` writes large models), opened and checked against the index.
//! A family maps the stored tensor names to its own weights.

use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a model folder keeps its weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFiles {
    /// One `model.safetensors`.
    Single(PathBuf),
    /// `model.safetensors.index.json` and the shards its `weight_map` names.
    Sharded {
        /// The index file.
        index: PathBuf,
        /// The shard files, in the order of their first mention.
        shards: Vec<PathBuf>,
        /// Tensor name -> shard file name, as the index says.
        map: BTreeMap<String, String>,
    },
}

impl WeightFiles {
    /// Finds the weights of `dir`: `model.safetensors` if present, else the sharded form.
    pub fn find(dir: &Path) -> Result<WeightFiles> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(WeightFiles::Single(single));
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.exists() {
            let pytorch = dir.join("pytorch_model.bin");
            let hint = if pytorch.exists() {
                " (pytorch_model.bin is there: convert it with `save_pretrained(..., safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(Error::Format {
                path: single,
                msg: format!(
                    "missing: a model folder needs model.safetensors or model.safetensors.index.json with its shards{hint}"
                ),
            });
        }
        let bad = |msg: String| Error::Format {
            path: index.clone(),
            msg,
        };
        let v: serde_json::Value = serde_json::from_str(&crate::io::read_text(&index)?)
            .map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object (tensor name -> shard file)".into()))?;
        let mut map = BTreeMap::new();
        let mut shards: Vec<PathBuf> = vec![];
        for (name, file) in obj {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name")))?;
            // A shard is a file beside the index, never a path elsewhere.
            if file.is_empty() || Path::new(file).components().count() != 1 || file == ".." {
                return Err(bad(format!(
                    "weight_map[{name:?}] = {file:?}: expected a file name in the model folder"
                )));
            }
            let p = dir.join(file);
            if !shards.contains(&p) {
                if !p.exists() {
                    return Err(bad(format!("names the shard {file}, which is missing")));
                }
                shards.push(p);
            }
            map.insert(name.clone(), file.to_string());
        }
        if shards.is_empty() {
            return Err(bad("\"weight_map\" is empty".into()));
        }
        Ok(WeightFiles::Sharded { index, shards, map })
    }

    /// The file that names the weights in errors: the single file, or the index.
    pub fn what(&self) -> &Path {
        match self {
            WeightFiles::Single(p) => p,
            WeightFiles::Sharded { index, .. } => index,
        }
    }

    /// Opens every weight file; a sharded index must not map a tensor to a shard that lacks
    /// it.
    pub fn open(&self) -> Result<Vec<SafetensorsFile>> {
        match self {
            WeightFiles::Single(path) => Ok(vec![SafetensorsFile::open(path)?]),
            WeightFiles::Sharded { index, shards, map } => {
                let files = shards
                    .iter()
                    .map(|p| SafetensorsFile::open(p))
                    .collect::<Result<Vec<_>>>()?;
                for (name, shard) in map {
                    let Some(f) = files
                        .iter()
                        .find(|f| f.path().file_name() == Some(std::ffi::OsStr::new(shard)))
                    else {
                        continue;
                    };
                    if f.shape(name).is_err() {
                        return Err(Error::Format {
                            path: index.clone(),
                            msg: format!("maps tensor {name:?} to {shard}, which does not hold it"),
                        });
                    }
                }
                Ok(files)
            }
        }
    }

    /// Every file the weights are read from (the index first when sharded).
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            WeightFiles::Single(p) => vec![p.clone()],
            WeightFiles::Sharded { index, shards, .. } => {
                let mut v = vec![index.clone()];
                v.extend(shards.iter().cloned());
                v
            }
        }
    }
}
