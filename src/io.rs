//! File helpers: reads with errors that name the file, atomic writes; and the memory
//! available to this process (read from Linux's `/proc` and cgroup files).

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

/// A safetensors file whose header is read and checked when it is opened and whose tensors
/// are read from disk one at a time, when asked for: a model's shards are never held in
/// memory whole (loading a checkpoint needs its weights' memory and one read buffer, not the
/// files' too). Conversions name the file and the tensor in every error.
pub struct SafetensorsFile {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
    tensors: std::collections::BTreeMap<String, TensorInfo>,
    metadata: std::collections::HashMap<String, String>,
    /// Byte offset of the data section (after the length and the JSON header).
    data_start: u64,
}

/// One tensor of a safetensors header.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range in the data section.
    data_offsets: (usize, usize),
}

/// Bytes read from disk at a time when a tensor is converted into a caller's buffer.
const READ_CHUNK: usize = 1 << 20;

/// Largest header accepted (the safetensors format's own limit).
const MAX_HEADER: u64 = 100_000_000;

impl SafetensorsFile {
    /// Opens a safetensors file and checks its header: valid JSON, known dtypes, each
    /// tensor's byte range the size its shape and dtype imply, the ranges back to back from
    /// the start of the data, and the data exactly the rest of the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        use std::io::Read;
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {msg}"),
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(bad(format!(
                "{len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(io)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            return Err(bad(format!(
                "header length {n} does not fit the file ({len} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let text =
            std::str::from_utf8(&header).map_err(|e| bad(format!("header is not UTF-8 ({e})")))?;
        let header: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| bad(format!("header: {e}")))?;
        let mut metadata = std::collections::HashMap::new();
        let mut tensors = std::collections::BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(v)
                    .map_err(|e| bad(format!("__metadata__ must map strings to strings: {e}")))?;
                continue;
            }
            let info: TensorInfo = serde_json::from_value(v)
                .map_err(|e| bad(format!("tensor {name:?} in the header: {e}")))?;
            tensors.insert(name, info);
        }
        let mut infos: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
        infos.sort_by_key(|(_, i)| i.data_offsets);
        let mut end = 0usize;
        for (name, info) in &infos {
            let (s, e) = info.data_offsets;
            let size = info
                .shape
                .iter()
                .try_fold(info.dtype.bitsize(), |a, &d| a.checked_mul(d))
                .filter(|bits| bits % 8 == 0)
                .map(|bits| bits / 8);
            if s != end || e < s || size != Some(e - s) {
                return Err(bad(format!(
                    "tensor {name:?} ({:?} {:?}) has data offsets {s}..{e}, expected {end}..{}",
                    info.dtype,
                    info.shape,
                    size.map_or("overflow".into(), |z| (end + z).to_string())
                )));
            }
            end = e;
        }
        if 8 + n + end as u64 != len {
            return Err(bad(format!(
                "the header describes {end} bytes of data, the file holds {}",
                len - 8 - n
            )));
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
            tensors,
            metadata,
            data_start: 8 + n,
        })
    }

    /// The string metadata of the header (empty if none).
    pub fn metadata(&self) -> Result<std::collections::HashMap<String, String>> {
        Ok(self.metadata.clone())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.tensors.keys().cloned().collect())
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.info(name)?.shape.clone())
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::Format {
            path: self.path.clone(),
            msg: format!("tensor {name:?} is missing"),
        })
    }

    fn wrong_dtype(&self, name: &str, got: safetensors::Dtype, expected: &str) -> Error {
        Error::Format {
            path: self.path.clone(),
            msg: format!("tensor {name:?} has dtype {got:?}, expected {expected}"),
        }
    }

    /// Reads `buf.len()` bytes of tensor data from byte `offset` of the data section.
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        // A poisoned lock only means another reader panicked; the file handle is intact.
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.seek(SeekFrom::Start(self.data_start + offset as u64))
            .map_err(io)?;
        f.read_exact(buf).map_err(io)
    }

    /// All bytes of tensor `name`, with its description.
    fn bytes(&self, name: &str) -> Result<(&TensorInfo, Vec<u8>)> {
        let info = self.info(name)?;
        let (s, e) = info.data_offsets;
        let mut buf = vec![0u8; e - s];
        self.read_at(s, &mut buf)?;
        Ok((info, buf))
    }

    /// A floating-point tensor (f64, f32, f16 or bf16 on disk) as f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let shape = self.shape(name)?;
        let mut v = vec![0f32; shape.iter().product()];
        self.f32_into(name, &mut v)?;
        Ok((shape, v))
    }

    /// A floating-point tensor (f64, f32, f16 or bf16 on disk) converted to f32 into `out`,
    /// which must hold exactly its elements; returns its shape. The file is read
    /// [`READ_CHUNK`] bytes at a time: no copy of the whole tensor is made on the way.
    pub fn f32_into(&self, name: &str, out: &mut [f32]) -> Result<Vec<usize>> {
        use safetensors::Dtype;
        let info = self.info(name)?;
        let n: usize = info.shape.iter().product();
        if n != out.len() {
            return Err(Error::Format {
                path: self.path.clone(),
                msg: format!(
                    "tensor {name:?} has shape {:?} ({n} values), expected {} values",
                    info.shape,
                    out.len()
                ),
            });
        }
        let dtype = info.dtype;
        if !matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(self.wrong_dtype(name, dtype, "f32, f16 or bf16"));
        }
        let size = dtype.bitsize() / 8;
        let per_read = READ_CHUNK / size;
        let mut buf = vec![0u8; per_read.min(n) * size];
        for (i, dst) in out.chunks_mut(per_read).enumerate() {
            let bytes = &mut buf[..dst.len() * size];
            self.read_at(info.data_offsets.0 + i * per_read * size, bytes)?;
            for (o, c) in dst.iter_mut().zip(bytes.chunks_exact(size)) {
                *o = match dtype {
                    Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32,
                    Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                };
            }
        }
        Ok(info.shape.clone())
    }

    /// A floating-point tensor as f64 (exact for every stored float type), with its shape.
    pub fn f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        use safetensors::Dtype;
        let (info, d) = self.bytes(name)?;
        let v: Vec<f64> = match info.dtype {
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
            other => return Err(self.wrong_dtype(name, other, "f32, f16 or bf16")),
        };
        Ok((info.shape.clone(), v))
    }

    /// An integer tensor (i32 or i64 on disk) as i64, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        use safetensors::Dtype;
        let (info, d) = self.bytes(name)?;
        let v = match info.dtype {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            other => return Err(self.wrong_dtype(name, other, "i32 or i64")),
        };
        Ok((info.shape.clone(), v))
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

/// Bytes of memory this process can still take, as far as Linux says: `MemAvailable` of
/// `/proc/meminfo`, lowered to what the memory cgroup's limit leaves (its usage less the
/// reclaimable inactive file cache) when there is one. `None` where neither is readable.
pub fn memory_available() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let system = read("/proc/meminfo").and_then(|t| meminfo_available(&t));
    // cgroup v2, then v1.
    let cgroup = cgroup_available(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory.current").as_deref(),
        read("/sys/fs/cgroup/memory.stat").as_deref(),
    )
    .or_else(|| {
        cgroup_available(
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes").as_deref(),
            read("/sys/fs/cgroup/memory/memory.stat").as_deref(),
        )
    });
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// What a memory cgroup's limit leaves: `limit - (usage - inactive file cache)`; `None`
/// without a numeric limit (`max`, or v1's huge "unlimited") or usage.
fn cgroup_available(limit: Option<&str>, usage: Option<&str>, stat: Option<&str>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = usage?.trim().parse().ok()?;
    let inactive = stat
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                match (f.next(), f.next()) {
                    (Some("inactive_file" | "total_inactive_file"), Some(v)) => v.parse().ok(),
                    _ => None,
                }
            })
        })
        .unwrap_or(0u64);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pa-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    fn write(path: &Path, tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, dt, shape, bytes)| {
                let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).unwrap();
                (n.to_string(), v)
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// Tensors larger than one read chunk, in every float dtype, read back exactly (f16 and
    /// bf16 values are representable, so the f32 results are exact), through `f32_into`,
    /// `f32` and `f64`; integers through `i64`.
    #[test]
    fn reads_tensors_piece_by_piece() {
        let mut rng = Rng::new(5);
        let n = READ_CHUNK / 2 + 12_345; // f32: over 2 chunks; f16: 1.x chunks
        let vals: Vec<f32> = rng.normal_vec(n, 3.0);
        let h: Vec<half::f16> = vals.iter().map(|&x| half::f16::from_f32(x)).collect();
        let b: Vec<half::bf16> = vals.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let ints: Vec<i32> = (0..97).map(|_| rng.below(1000) as i32 - 500).collect();
        let p = tmp("pieces.safetensors");
        use safetensors::Dtype::*;
        write(
            &p,
            vec![
                ("a32", F32, vec![n], bytemuck::cast_slice(&vals).to_vec()),
                ("b16", F16, vec![n], bytemuck::cast_slice(&h).to_vec()),
                ("c16", BF16, vec![1, n], bytemuck::cast_slice(&b).to_vec()),
                ("ids", I32, vec![97], bytemuck::cast_slice(&ints).to_vec()),
            ],
        );
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.names().unwrap(), ["a32", "b16", "c16", "ids"]);
        let mut out = vec![0f32; n];
        assert_eq!(f.f32_into("a32", &mut out).unwrap(), [n]);
        assert_eq!(out, vals);
        f.f32_into("b16", &mut out).unwrap();
        assert!(out.iter().zip(&h).all(|(o, x)| *o == x.to_f32()));
        assert_eq!(f.f32("c16").unwrap().0, [1, n]);
        f.f32_into("c16", &mut out).unwrap();
        assert!(out.iter().zip(&b).all(|(o, x)| *o == x.to_f32()));
        let (_, d) = f.f64("b16").unwrap();
        assert!(d.iter().zip(&h).all(|(o, x)| *o == x.to_f64()));
        let (_, i) = f.i64("ids").unwrap();
        assert!(i.iter().zip(&ints).all(|(a, b)| *a == *b as i64));
        // Wrong sizes, dtypes and names are refused by name.
        let e = f
            .f32_into("a32", &mut out[..n - 1])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a32") && e.contains(&format!("{}", n - 1)),
            "{e}"
        );
        let e = f.f64("ids").unwrap_err().to_string();
        assert!(e.contains("ids") && e.contains("I32"), "{e}");
        let e = f.i64("a32").unwrap_err().to_string();
        assert!(e.contains("a32") && e.contains("i32 or i64"), "{e}");
        let e = f.shape("nope").unwrap_err().to_string();
        assert!(e.contains("\"nope\" is missing"), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    /// Truncated files, headers that overrun the file, offsets that do not match the shapes
    /// and trailing bytes are refused at open, naming the file.
    #[test]
    fn refuses_inconsistent_files() {
        let p = tmp("bad.safetensors");
        use safetensors::Dtype::*;
        let data: Vec<f32> = Rng::new(9).normal_vec(10, 1.0);
        write(
            &p,
            vec![("w", F32, vec![2, 5], bytemuck::cast_slice(&data).to_vec())],
        );
        let good = std::fs::read(&p).unwrap();
        let open_err = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match SafetensorsFile::open(&p) {
                Ok(_) => panic!("a bad file was accepted"),
                Err(e) => e.to_string(),
            }
        };
        for (bytes, want) in [
            (good[..5].to_vec(), "shorter than the 8-byte header length"),
            (
                good[..good.len() - 4].to_vec(),
                "the header describes 40 bytes of data",
            ),
            ([good.as_slice(), &[0u8; 3]].concat(), "the file holds 43"),
        ] {
            let e = open_err(&bytes);
            assert!(e.contains(want) && e.contains("bad.safetensors"), "{e}");
        }
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        assert!(open_err(&huge).contains("does not fit the file"));
        // The shape says 12 values, the offsets hold 10.
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
        let wrong = header.replace("[2,5]", "[3,4]");
        assert_ne!(wrong, header);
        let e = open_err(&[&good[..8], wrong.as_bytes(), &good[8 + n..]].concat());
        assert!(
            e.contains("\"w\"") && e.contains("data offsets 0..40"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn memory_available_reads_meminfo_and_cgroup_limits() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        // v2: 8 GiB limit, 6 GiB used of which 1 GiB reclaimable file cache.
        let stat = "anon 100\nfile 200\ninactive_file 1073741824\nactive_file 5\n";
        assert_eq!(
            cgroup_available(Some("8589934592\n"), Some("6442450944\n"), Some(stat)),
            Some(3 << 30)
        );
        assert_eq!(cgroup_available(Some("max\n"), Some("1\n"), None), None);
        // v1 "unlimited" is a huge number.
        assert_eq!(
            cgroup_available(Some("9223372036854771712"), Some("5"), None),
            None
        );
        // Over the limit: nothing left, not an underflow.
        assert_eq!(cgroup_available(Some("100"), Some("150"), None), Some(0));
        // This machine answers something (Linux).
        if cfg!(target_os = "linux") {
            assert!(memory_available().is_some_and(|b| b > 0));
        }
    }
}
