//! Tensor handles: owned tensors and borrowed strided views.
//!
//! A [`Tensor`] owns its storage (host memory today; device buffers are added by the device
//! backends) and is always contiguous. Kernels and backend operations take borrowed views:
//! [`TensorView`] (read) and [`TensorViewMut`] (write), which carry a dtype, a shape and
//! explicit element strides for every dimension. Views are how GPT-2's fused `qkv` buffer
//! `[B, T, 3, H, D]` is read in place as `q`, `k`, `v` (`select(2, i)`), and how one PEFT
//! prefix tensor `[P, L, 2, H, D]` provides every layer's `k_pre`/`v_pre`.
//!
//! Safety model: a view is created from a borrow of its tensor, so Rust's borrow rules keep
//! readers and writers apart. A mutable view can be split into disjoint mutable views
//! ([`TensorViewMut::unbind`]), the strided analogue of `split_at_mut`; every access then
//! touches only the view's own elements, one contiguous row at a time. Every view's
//! addressable range is checked against its buffer when the view is made, so no index that
//! passes the layout can leave the buffer.
//!
//! The module is split by concept: `dtype.rs` (element types and the conversion of element
//! rows to and from f32), `layout.rs` (shape, strides and offset arithmetic), `storage.rs`
//! (where the bytes live, and the owned [`Tensor`]) and `view.rs` (the borrowed strided views
//! and the row writer the CPU kernels share between threads). The files are private and
//! everything is re-exported here, so callers name `crate::tensor::X`, never the file.

mod dtype;
mod layout;
mod storage;
mod view;

pub(crate) use dtype::check_dtype;
pub use dtype::{DType, Element};
pub use layout::{Layout, MAX_RANK};
pub use storage::{DeviceMemory, Location, Tensor};
pub(crate) use view::RowWriter;
pub use view::{TensorView, TensorViewMut};
