//! Borrowed strided views: [`TensorView`] (read) and [`TensorViewMut`] (write) over a
//! tensor's buffer or foreign memory, their derivations, host row access, and the
//! [`RowWriter`] through which the CPU kernels write disjoint rows from several threads.
//! The safety model of the module doc of [`crate::tensor`] lives here: every derived layout
//! is checked against the buffer's length when the view is made.

use super::dtype::{check_dtype, read_row_f32, write_row_f32, DType, Element};
use super::layout::Layout;
use super::storage::Location;
use crate::error::{Error, Result};
use std::fmt;
use std::marker::PhantomData;

/// The untyped description shared by both view kinds.
#[derive(Clone, Copy, Debug)]
pub(super) struct RawView {
    /// Address of element 0 of the buffer (host pointer or device address).
    pub(super) addr: u64,
    /// Number of elements in the buffer from `addr`.
    pub(super) cap: usize,
    pub(super) location: Location,
    pub(super) dtype: DType,
    pub(super) layout: Layout,
}

impl RawView {
    fn with_layout(&self, what: &str, layout: Layout) -> Result<RawView> {
        if layout.numel() > 0 && layout.span() > self.cap {
            return Err(Error::layout(
                what,
                format!(
                    "layout {layout:?} reaches element {} of a buffer of {} elements",
                    layout.span() - 1,
                    self.cap
                ),
            ));
        }
        Ok(RawView { layout, ..*self })
    }

    fn check_row(&self, elem: usize, n: usize) {
        // Callers derive `elem` from the layout, which was checked against `cap`.
        assert!(elem + n <= self.cap, "row {elem}+{n} outside buffer");
        assert_eq!(
            self.location,
            Location::Host,
            "host access to a device view"
        );
    }

    /// Host bytes of one contiguous row.
    ///
    /// # Safety
    /// The view must be a host view whose buffer outlives the returned slice, and no one
    /// may write these elements while the slice lives.
    unsafe fn row_bytes<'a>(&self, elem: usize, n: usize) -> &'a [u8] {
        self.check_row(elem, n);
        let sz = self.dtype.size();
        std::slice::from_raw_parts((self.addr as usize as *const u8).add(elem * sz), n * sz)
    }

    /// Mutable host bytes of one contiguous row.
    ///
    /// # Safety
    /// As `row_bytes`, and no other reference to these elements may exist.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_bytes_mut<'a>(&self, elem: usize, n: usize) -> &'a mut [u8] {
        self.check_row(elem, n);
        let sz = self.dtype.size();
        std::slice::from_raw_parts_mut((self.addr as usize as *mut u8).add(elem * sz), n * sz)
    }
}

/// A borrowed, strided, read-only view of tensor elements on some device.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a view is a shared borrow of plain data, like `&[T]`.
unsafe impl Send for TensorView<'_> {}
unsafe impl Sync for TensorView<'_> {}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorView({} {:?} on {})",
            self.raw.dtype, self.raw.layout, self.raw.location
        )
    }
}

/// A borrowed, strided, writable view of tensor elements on some device.
pub struct TensorViewMut<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a mutable view is an exclusive borrow of plain data, like `&mut [T]`.
unsafe impl Send for TensorViewMut<'_> {}
unsafe impl Sync for TensorViewMut<'_> {}

impl fmt::Debug for TensorViewMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorViewMut({} {:?} on {})",
            self.raw.dtype, self.raw.layout, self.raw.location
        )
    }
}

macro_rules! view_accessors {
    () => {
        /// Element type.
        pub fn dtype(&self) -> DType {
            self.raw.dtype
        }
        /// Shape, outermost first.
        pub fn dims(&self) -> &[usize] {
            self.raw.layout.dims()
        }
        /// Element strides.
        pub fn strides(&self) -> &[usize] {
            self.raw.layout.strides()
        }
        /// Shape, strides and offset.
        pub fn layout(&self) -> Layout {
            self.raw.layout
        }
        /// Number of elements.
        pub fn numel(&self) -> usize {
            self.raw.layout.numel()
        }
        /// Where the elements live.
        pub fn location(&self) -> Location {
            self.raw.location
        }
        /// Number of elements in the underlying buffer from [`Self::base_addr`].
        pub fn buffer_len(&self) -> usize {
            self.raw.cap
        }
        /// Device address (or host pointer) of element 0 of the underlying buffer; element
        /// `i` of the view is at `base_addr() + layout().index(i) * dtype().size()`.
        pub fn base_addr(&self) -> u64 {
            self.raw.addr
        }
    };
}

impl<'a> TensorView<'a> {
    view_accessors!();

    /// The view of a whole buffer that a [`super::Tensor`] hands out of itself; the tensor's
    /// borrow is what `'a` stands for.
    pub(super) fn from_raw(raw: RawView) -> TensorView<'a> {
        TensorView {
            raw,
            _borrow: PhantomData,
        }
    }

    /// A view of foreign memory (an inference engine's own buffers).
    ///
    /// # Safety
    /// `addr` must point to `cap` elements of `dtype` at `location` that stay valid and
    /// unwritten (except through this crate's outputs that do not overlap) for `'a`.
    pub unsafe fn from_raw_parts(
        addr: u64,
        cap: usize,
        location: Location,
        dtype: DType,
        layout: Layout,
    ) -> Result<TensorView<'a>> {
        let base = RawView {
            addr,
            cap,
            location,
            dtype,
            layout: Layout::contiguous(&[cap])?,
        };
        Ok(TensorView {
            raw: base.with_layout("from_raw_parts", layout)?,
            _borrow: PhantomData,
        })
    }

    fn derive(&self, what: &str, layout: Result<Layout>) -> Result<TensorView<'a>> {
        Ok(TensorView {
            raw: self.raw.with_layout(what, layout?)?,
            _borrow: PhantomData,
        })
    }

    /// The view with dimension `dim` removed at `index`.
    pub fn select(&self, dim: usize, index: usize) -> Result<TensorView<'a>> {
        self.derive("select", self.raw.layout.select(dim, index))
    }
    /// The view restricted to `start..start+len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView<'a>> {
        self.derive("narrow", self.raw.layout.narrow(dim, start, len))
    }
    /// The view with a new dimension of size 1 before `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Result<TensorView<'a>> {
        self.derive("unsqueeze", self.raw.layout.unsqueeze(dim))
    }
    /// A contiguous view seen with another shape of the same size.
    pub fn reshape(&self, shape: &[usize]) -> Result<TensorView<'a>> {
        self.derive("reshape", self.raw.layout.reshape(shape))
    }
    /// The same buffer seen through an explicit layout (checked against the buffer).
    pub fn as_strided(
        &self,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<TensorView<'a>> {
        self.derive("as_strided", Layout::new(shape, strides, offset))
    }

    /// One contiguous host row of `T` starting at element index `elem` (from
    /// [`Layout::index`]). Errors when the dtype differs or the view is not on the host.
    pub fn host_row<T: Element>(&self, elem: usize, n: usize) -> Result<&'a [T]> {
        check_dtype("host_row", self.raw.dtype, T::DTYPE)?;
        self.check_host("host_row")?;
        self.check_elem("host_row", elem, n)?;
        // SAFETY: host view borrowed for 'a; shared borrows exclude writers. Alignment holds
        // because buffers are 16-aligned and `elem` counts whole elements.
        bytemuck::try_cast_slice(unsafe { self.raw.row_bytes(elem, n) }).map_err(|e| {
            Error::layout(
                "host_row",
                format!("cannot view the bytes as {}: {e}", T::DTYPE),
            )
        })
    }

    /// All elements of a contiguous host view as one typed slice.
    pub fn contiguous_slice<T: Element>(&self) -> Result<&'a [T]> {
        if !self.raw.layout.is_contiguous() {
            return Err(Error::layout(
                "contiguous_slice",
                format!("needs a contiguous view, got {:?}", self.raw.layout),
            ));
        }
        self.host_row(self.raw.layout.offset(), self.numel())
    }

    /// Reads `out.len()` contiguous host elements from element index `elem`, as f32.
    pub fn read_f32(&self, elem: usize, out: &mut [f32]) -> Result<()> {
        self.check_host("read_f32")?;
        self.check_elem("read_f32", elem, out.len())?;
        // SAFETY: as in `host_row`.
        let bytes = unsafe { self.raw.row_bytes(elem, out.len()) };
        read_row_f32(self.raw.dtype, bytes, 0, out);
        Ok(())
    }

    /// Copies every element, in row-major order of the view, into `out` as f32.
    pub fn gather_f32(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.numel() {
            return Err(Error::shape(
                "gather_f32 output",
                format!("{} elements", self.numel()),
                &[out.len()],
            ));
        }
        self.for_each_row(|row, elem| self.read_f32(elem, &mut out[row.clone()]))
    }

    /// Element at a multi-index, as f64 (host views only; slow, for references and tests).
    pub fn get_f64(&self, idx: &[usize]) -> Result<f64> {
        if idx.len() != self.raw.layout.rank() || idx.iter().zip(self.dims()).any(|(i, d)| i >= d) {
            return Err(Error::index(
                "get_f64",
                format!("index {idx:?} of shape {:?}", self.dims()),
            ));
        }
        let mut x = [0f32];
        self.read_f32(self.raw.layout.index(idx), &mut x)?;
        Ok(x[0] as f64)
    }

    fn for_each_row(
        &self,
        mut f: impl FnMut(std::ops::Range<usize>, usize) -> Result<()>,
    ) -> Result<()> {
        let l = self.raw.layout;
        if l.numel() == 0 {
            return Ok(());
        }
        if l.rank() == 0 {
            return f(0..1, l.offset());
        }
        let inner = l.dims()[l.rank() - 1];
        if l.strides()[l.rank() - 1] != 1 && inner > 1 {
            return Err(Error::layout(
                "view",
                format!("last dimension must be contiguous (stride 1), got {l:?}"),
            ));
        }
        let outer = &l.dims()[..l.rank() - 1];
        let mut idx = vec![0usize; l.rank()];
        for r in 0..l.numel() / inner {
            f(r * inner..(r + 1) * inner, l.index(&idx))?;
            for d in (0..outer.len()).rev() {
                idx[d] += 1;
                if idx[d] < outer[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(())
    }

    fn check_host(&self, what: &str) -> Result<()> {
        if self.raw.location != Location::Host {
            return Err(Error::device(
                what,
                format!("needs a host view, this one is on {}", self.raw.location),
            ));
        }
        Ok(())
    }
    fn check_elem(&self, what: &str, elem: usize, n: usize) -> Result<()> {
        if elem < self.raw.layout.offset() || elem.checked_add(n).is_none_or(|e| e > self.raw.cap) {
            return Err(Error::index(
                what,
                format!(
                    "elements {elem}..{} outside the view's buffer of {}",
                    elem.saturating_add(n),
                    self.raw.cap
                ),
            ));
        }
        Ok(())
    }
}

impl<'a> TensorViewMut<'a> {
    view_accessors!();

    /// As [`TensorView::from_raw`], for the tensor's exclusive borrow.
    pub(super) fn from_raw(raw: RawView) -> TensorViewMut<'a> {
        TensorViewMut {
            raw,
            _borrow: PhantomData,
        }
    }

    /// A writable view of foreign memory.
    ///
    /// # Safety
    /// As [`TensorView::from_raw_parts`], and nothing else may read or write the elements of
    /// `layout` for `'a`.
    pub unsafe fn from_raw_parts(
        addr: u64,
        cap: usize,
        location: Location,
        dtype: DType,
        layout: Layout,
    ) -> Result<TensorViewMut<'a>> {
        let v = TensorView::from_raw_parts(addr, cap, location, dtype, layout)?;
        Ok(TensorViewMut {
            raw: v.raw,
            _borrow: PhantomData,
        })
    }

    /// A read view of the same elements, borrowing this one.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView {
            raw: self.raw,
            _borrow: PhantomData,
        }
    }
    /// A shorter-lived mutable view of the same elements.
    pub fn reborrow(&mut self) -> TensorViewMut<'_> {
        TensorViewMut {
            raw: self.raw,
            _borrow: PhantomData,
        }
    }

    fn derive(self, what: &str, layout: Result<Layout>) -> Result<TensorViewMut<'a>> {
        Ok(TensorViewMut {
            raw: self.raw.with_layout(what, layout?)?,
            _borrow: PhantomData,
        })
    }

    /// The view with dimension `dim` removed at `index`.
    pub fn select(self, dim: usize, index: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.select(dim, index);
        self.derive("select", l)
    }
    /// The view restricted to `start..start+len` along `dim`.
    pub fn narrow(self, dim: usize, start: usize, len: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.narrow(dim, start, len);
        self.derive("narrow", l)
    }
    /// The view with a new dimension of size 1 before `dim`.
    pub fn unsqueeze(self, dim: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.unsqueeze(dim);
        self.derive("unsqueeze", l)
    }
    /// A contiguous view seen with another shape of the same size.
    pub fn reshape(self, shape: &[usize]) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.reshape(shape);
        self.derive("reshape", l)
    }

    /// Splits the view along `dim` (not the last, contiguous one) into `dims()[dim]` disjoint
    /// views — e.g. a `dqkv [B, T, 3, H, D]` gradient buffer into `dq`, `dk`, `dv`.
    pub fn unbind(self, dim: usize) -> Result<Vec<TensorViewMut<'a>>> {
        let l = self.raw.layout;
        if dim + 1 >= l.rank() {
            return Err(Error::index(
                "unbind",
                format!(
                    "dimension {dim} of {:?}: only outer dimensions can be split",
                    l.dims()
                ),
            ));
        }
        // Disjointness needs distinct slices along `dim` not to overlap: a zero stride
        // (broadcast) along `dim` would alias.
        if l.strides()[dim] == 0 && l.dims()[dim] > 1 && l.numel() > 0 {
            return Err(Error::layout(
                "unbind",
                "dimension with stride 0 cannot be split into writable views",
            ));
        }
        (0..l.dims()[dim])
            .map(|i| {
                Ok(TensorViewMut {
                    raw: self.raw.with_layout("unbind", l.select(dim, i)?)?,
                    _borrow: PhantomData,
                })
            })
            .collect()
    }

    /// Writes `vals` (converted from f32, rounded to nearest) to contiguous host elements
    /// starting at element index `elem`.
    pub fn write_f32(&mut self, elem: usize, vals: &[f32]) -> Result<()> {
        self.as_view().check_host("write_f32")?;
        self.as_view().check_elem("write_f32", elem, vals.len())?;
        // SAFETY: exclusive borrow of a host view; rows of one view never overlap those of a
        // sibling from `unbind`.
        let bytes = unsafe { self.raw.row_bytes_mut(elem, vals.len()) };
        write_row_f32(self.raw.dtype, bytes, vals);
        Ok(())
    }

    /// All elements of a contiguous host view as one mutable typed slice. A contiguous view
    /// covers exactly its own elements, so no sibling view can overlap the slice.
    pub fn contiguous_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        let v = self.as_view();
        if !v.raw.layout.is_contiguous() {
            return Err(Error::layout(
                "contiguous_slice_mut",
                format!("needs a contiguous view, got {:?}", v.raw.layout),
            ));
        }
        check_dtype("contiguous_slice_mut", v.raw.dtype, T::DTYPE)?;
        v.check_host("contiguous_slice_mut")?;
        let (off, n) = (v.raw.layout.offset(), v.numel());
        v.check_elem("contiguous_slice_mut", off, n)?;
        // SAFETY: exclusive borrow; the range is the view's own elements (see above).
        let bytes = unsafe { self.raw.row_bytes_mut(off, n) };
        bytemuck::try_cast_slice_mut(bytes).map_err(|e| {
            Error::layout(
                "contiguous_slice_mut",
                format!("cannot view the bytes as {}: {e}", T::DTYPE),
            )
        })
    }

    /// Fills every element of the view with `x`.
    pub fn fill(&mut self, x: f32) -> Result<()> {
        let n = *self.dims().last().unwrap_or(&1);
        let row = vec![x; n];
        let raw = self.raw;
        TensorView {
            raw,
            _borrow: PhantomData,
        }
        .for_each_row(|_, elem| self.write_f32(elem, &row))
    }

    /// Writes `data` (row-major over the view's shape) into the view.
    pub fn scatter_f32(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape(
                "scatter_f32 input",
                format!("{} elements", self.numel()),
                &[data.len()],
            ));
        }
        let raw = self.raw;
        TensorView {
            raw,
            _borrow: PhantomData,
        }
        .for_each_row(|rows, elem| self.write_f32(elem, &data[rows]))
    }

    /// A raw writer that the CPU kernels share between threads; see [`RowWriter`].
    pub(crate) fn row_writer(&mut self) -> Result<RowWriter<'_>> {
        self.as_view().check_host("row_writer")?;
        Ok(RowWriter {
            raw: self.raw,
            _borrow: PhantomData,
        })
    }
}

/// A shared handle through which several threads write *disjoint rows* of one host view.
/// The CPU kernels partition the rows between tasks; the handle checks bounds, the caller
/// guarantees disjointness.
#[derive(Clone, Copy)]
pub(crate) struct RowWriter<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: see the type's doc: writers of distinct rows do not overlap.
unsafe impl Send for RowWriter<'_> {}
unsafe impl Sync for RowWriter<'_> {}

impl RowWriter<'_> {
    /// Element index of a multi-index of the view.
    pub(crate) fn index(&self, idx: &[usize]) -> usize {
        self.raw.layout.index(idx)
    }
    /// Writes one row.
    ///
    /// # Safety
    /// No other thread may access elements `elem..elem + vals.len()` during the call.
    pub(crate) unsafe fn write_row(&self, elem: usize, vals: &[f32]) {
        let bytes = self.raw.row_bytes_mut(elem, vals.len());
        write_row_f32(self.raw.dtype, bytes, vals);
    }
}
