//! The crate's one error type.
//!
//! Every message names the argument, tensor or file involved and says what was expected,
//! so that a user can fix the call without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong in `prefix-attn`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor argument has the wrong shape.
    #[error("{arg}: shape {got:?}, expected {expected}")]
    Shape {
        /// The argument or tensor name.
        arg: String,
        /// What was expected, in words (e.g. "[B=2, Tq=5, Hq=4, D=64] like q").
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A tensor argument has the wrong element type.
    #[error("{arg}: dtype {got}, expected {expected}")]
    DType {
        /// The argument or tensor name.
        arg: String,
        /// What was expected.
        expected: String,
        /// The dtype that was given.
        got: String,
    },
    /// A view's strides, offset or alignment are unusable.
    #[error("{arg}: {msg}")]
    Layout {
        /// The argument or tensor name.
        arg: String,
        /// What is wrong.
        msg: String,
    },
    /// An index or length argument is out of range.
    #[error("{arg}: {msg}")]
    Index {
        /// The argument name.
        arg: String,
        /// What is wrong.
        msg: String,
    },
    /// Arguments live on different devices, or on a device the backend cannot use.
    #[error("{arg}: {msg}")]
    Device {
        /// The argument name.
        arg: String,
        /// What is wrong.
        msg: String,
    },
    /// A requested feature or configuration is not implemented.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A kernel failed (on the emulator: a kernel error it detected; on a GPU: a launch or
    /// execution error).
    #[error("kernel {kernel}: {msg}")]
    Kernel {
        /// The kernel.
        kernel: String,
        /// What went wrong.
        msg: String,
    },
    /// The paged KV cache has too few free pages for a request.
    #[error("KV cache: {needed} pages needed, {free} free of {total}")]
    OutOfPages {
        /// Pages the operation needed.
        needed: usize,
        /// Pages free.
        free: usize,
        /// Pages in the pool.
        total: usize,
    },
    /// Training stopped (a non-finite loss).
    #[error("{0}")]
    Training(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are malformed or disagree with what was expected.
    #[error("{path}: {msg}")]
    Format {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error.
    pub fn shape(arg: &str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            arg: arg.to_string(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
    /// A layout error.
    pub fn layout(arg: &str, msg: impl Into<String>) -> Self {
        Error::Layout {
            arg: arg.to_string(),
            msg: msg.into(),
        }
    }
    /// An index or length error.
    pub fn index(arg: &str, msg: impl Into<String>) -> Self {
        Error::Index {
            arg: arg.to_string(),
            msg: msg.into(),
        }
    }
    /// A device error.
    pub fn device(arg: &str, msg: impl Into<String>) -> Self {
        Error::Device {
            arg: arg.to_string(),
            msg: msg.into(),
        }
    }
}
