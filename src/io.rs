//! File helpers: reads with errors that name the file, atomic writes.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Reads a whole file.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a whole UTF-8 text file.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    String::from_utf8(bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
    })
}

/// Writes `data` to `path` atomically: a temporary file in the same folder, flushed and
/// synced, then renamed over the target. A crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            msg: "not a file path".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// A safetensors file held in memory, with conversions to f32 that name the file and tensor
/// in every error.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    /// Reads and validates the header of a safetensors file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bytes = read_bytes(path)?;
        let f = SafetensorsFile {
            path: path.to_path_buf(),
            bytes,
        };
        f.parsed()?;
        Ok(f)
    }

    fn parsed(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Format {
            path: self.path.clone(),
            msg: format!("not a valid safetensors file: {e}"),
        })
    }

    /// The string metadata of the header (empty if none).
    pub fn metadata(&self) -> Result<std::collections::HashMap<String, String>> {
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&self.bytes).map_err(|e| Error::Format {
                path: self.path.clone(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut n: Vec<String> = self
            .parsed()?
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        n.sort();
        Ok(n)
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let st = self.parsed()?;
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(t.shape().to_vec())
    }

    fn missing(&self, name: &str) -> Error {
        Error::Format {
            path: self.path.clone(),
            msg: format!("tensor {name:?} is missing"),
        }
    }

    /// A floating-point tensor (f64, f32, f16 or bf16 on disk) as f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, v) = self.f64(name)?;
        Ok((shape, v.into_iter().map(|x| x as f32).collect()))
    }

    /// A floating-point tensor (f64, f32, f16 or bf16 on disk) converted to f32 into `out`,
    /// which must hold exactly its elements; returns its shape. No copy of the whole tensor
    /// is made on the way (loading a model keeps each weight once).
    pub fn f32_into(&self, name: &str, out: &mut [f32]) -> Result<Vec<usize>> {
        use safetensors::Dtype;
        let st = self.parsed()?;
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let n: usize = t.shape().iter().product();
        if n != out.len() {
            return Err(Error::Format {
                path: self.path.clone(),
                msg: format!(
                    "tensor {name:?} has shape {:?} ({n} values), expected {} values",
                    t.shape(),
                    out.len()
                ),
            });
        }
        let d = t.data();
        let size = match t.dtype() {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(Error::Format {
                    path: self.path.clone(),
                    msg: format!("tensor {name:?} has dtype {other:?}, expected f32, f16 or bf16"),
                })
            }
        };
        let dtype = t.dtype();
        for (o, c) in out.iter_mut().zip(d.chunks_exact(size)) {
            *o = match dtype {
                Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32,
                Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            };
        }
        Ok(t.shape().to_vec())
    }

    /// A floating-point tensor as f64 (exact for every stored float type), with its shape.
    pub fn f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        use safetensors::Dtype;
        let st = self.parsed()?;
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let d = t.data();
        let v: Vec<f64> = match t.dtype() {
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            other => {
                return Err(Error::Format {
                    path: self.path.clone(),
                    msg: format!("tensor {name:?} has dtype {other:?}, expected f32, f16 or bf16"),
                })
            }
        };
        Ok((t.shape().to_vec(), v))
    }

    /// An integer tensor (i32 or i64 on disk) as i64, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        use safetensors::Dtype;
        let st = self.parsed()?;
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        let d = t.data();
        let v = match t.dtype() {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            other => {
                return Err(Error::Format {
                    path: self.path.clone(),
                    msg: format!("tensor {name:?} has dtype {other:?}, expected i32 or i64"),
                })
            }
        };
        Ok((t.shape().to_vec(), v))
    }
}

/// Writes f32 tensors to a safetensors file atomically.
pub fn write_safetensors_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    write_safetensors_f32_meta(path, tensors, None)
}

/// Writes f32 tensors and string metadata to a safetensors file atomically.
pub fn write_safetensors_f32_meta(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map(|v| (name.to_string(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("cannot serialise: {e}"),
        })?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("cannot serialise: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// What identifies a file's content: its size and the SHA-256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, lower-case hex.
    pub sha256: String,
}

/// Size and SHA-256 of a file, read in 1 MiB pieces (a model's weights are never held twice).
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileDigest { size, sha256 })
}

/// The string metadata of a safetensors file, reading only its header (a checkpoint's
/// tensors can weigh hundreds of MB).
pub fn safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("not a valid safetensors file: shorter than its header".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!(
            "not a valid safetensors file: a header of {len} bytes"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("not a valid safetensors file: truncated header".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}
