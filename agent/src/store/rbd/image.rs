//! librbd: an open image ([`Image`]): data path, allocation diff, identity,
//! layering. Snapshots and metadata are in `snap.rs`, pool-level calls
//! (create, clone, remove, list) in `pool.rs`.

use std::ffi::{c_int, c_void, CStr};
use std::future::Future;
use std::io;
use std::ptr;
use std::sync::{mpsc, Arc, Mutex};

use bytes::Bytes;
use rbd_sys as sys;

use super::aio::{self, InFlight};
use super::error::{check, check_len, cstring, error};
use super::rados::{c_text, IoCtx};
use crate::store::StoreError;

/// An open image, or a read-only view of one of its snapshots (`rbd_image_t`).
/// Keeps its IO context (and through it the cluster) alive; closed once, in `Drop`.
pub(super) struct Image {
    handle: sys::rbd_image_t,
    /// `pool/image` or `pool/image@snap`, for error messages.
    spec: String,
    ioctx: Arc<IoCtx>,
    /// Asynchronous requests not yet called back; `Drop` waits for them.
    inflight: Arc<InFlight>,
}

// SAFETY: librbd's ImageCtx guards its state with its own locks (owner_lock,
// image_lock) and its C API may be called for IO and maintenance from several
// threads at once. This type never calls the one call that changes what a
// handle reads (`rbd_snap_set`); the snapshot is fixed at open. `rbd_close`
// runs only in `Drop`, which has exclusive access.
unsafe impl Send for Image {}
// SAFETY: see `Send`: every `&self` method is a librbd call that is safe to run concurrently on one image.
unsafe impl Sync for Image {}

/// One range reported by `rbd_diff_iterate2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DiffExtent {
    /// Start offset.
    pub(super) offset: u64,
    /// Length in bytes.
    pub(super) length: u64,
    /// Holds data (false: zeroed or deallocated since the start snapshot).
    pub(super) exists: bool,
}

/// The snapshot an image is layered on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ParentSpec {
    /// Parent pool.
    pub(super) pool: String,
    /// Parent image name.
    pub(super) image: String,
    /// Parent snapshot name.
    pub(super) snap: String,
}

/// `pool/image` or `pool/image@snap`.
pub(super) fn spec(pool: &str, image: &str, snap: Option<&str>) -> String {
    match snap {
        Some(snap) => format!("{pool}/{image}@{snap}"),
        None => format!("{pool}/{image}"),
    }
}

impl Image {
    /// Opens `name` in `ioctx`'s pool, at snapshot `snap` (read-only) or at head.
    pub(super) fn open(
        ioctx: &Arc<IoCtx>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Self, StoreError> {
        let spec = spec(ioctx.pool(), name, snap);
        let c_name = cstring(name, "rbd_open", &spec)?;
        let c_snap = snap.map(|s| cstring(s, "rbd_open", &spec)).transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        let (op, rc) = if read_only || snap.is_some() {
            // SAFETY: live IO context; valid out-pointer; NUL-terminated strings that outlive the call
            // (a NULL snapshot name means head).
            ("rbd_open_read_only", unsafe {
                sys::rbd_open_read_only(ioctx.raw(), c_name.as_ptr(), &mut handle, snap_ptr)
            })
        } else {
            // SAFETY: as above.
            ("rbd_open", unsafe { sys::rbd_open(ioctx.raw(), c_name.as_ptr(), &mut handle, ptr::null()) })
        };
        check(rc, op, &spec)?;
        Ok(Self { handle, spec, ioctx: ioctx.clone(), inflight: Arc::default() })
    }

    /// `pool/image[@snap]`.
    pub(super) fn spec(&self) -> &str {
        &self.spec
    }

    /// The IO context the image was opened in.
    pub(super) fn ioctx(&self) -> &Arc<IoCtx> {
        &self.ioctx
    }

    /// The raw handle, for the other wrapper modules.
    pub(super) fn raw(&self) -> sys::rbd_image_t {
        self.handle
    }

    /// Size in bytes (of the snapshot, for a snapshot view).
    pub(super) fn size(&self) -> Result<u64, StoreError> {
        let mut size = 0u64;
        // SAFETY: open image; valid out-pointer.
        let rc = unsafe { sys::rbd_get_size(self.handle, &mut size) };
        check(rc, "rbd_get_size", &self.spec)?;
        Ok(size)
    }

    /// Fills `buf` from `offset`.
    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        // SAFETY: open image; `buf` is valid for `buf.len()` bytes of writes for the whole (synchronous) call.
        let rc = unsafe { sys::rbd_read(self.handle, offset, buf.len(), buf.as_mut_ptr().cast()) };
        let done = check_len(rc, "rbd_read", &self.spec)?;
        short("read", offset, done, buf.len())
    }

    /// Starts reading `len` bytes at `offset` (`rbd_aio_read`) into the
    /// spare capacity after `buf`'s content; the future yields `buf` with
    /// them appended. It holds nothing of the image: dropping it abandons
    /// the result, not the buffer.
    pub(super) fn aio_read(
        &self,
        mut buf: Vec<u8>,
        len: usize,
        offset: u64,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send + 'static {
        buf.reserve_exact(len);
        let ptr = buf.spare_capacity_mut().as_mut_ptr();
        let handle = self.handle;
        // SAFETY: one rbd_aio_read on this open image (kept open by `inflight` until the callback);
        // `ptr..ptr+len` is spare capacity of `buf`'s heap allocation, which moves into the request
        // unchanged and lives until the callback.
        let request =
            unsafe { aio::submit(&self.inflight, buf, |c| sys::rbd_aio_read(handle, offset, len, ptr.cast(), c)) };
        let spec = self.spec.clone();
        async move {
            let (n, mut buf) = aio::finish(request, "rbd_aio_read", spec).await?;
            short("read", offset, n, len)?;
            // SAFETY: librbd initialized all `len` bytes after the old length (it reported `len` read; holes
            // and parent-less ranges are zero-filled), and `reserve_exact` made room for them.
            unsafe { buf.set_len(buf.len() + len) };
            Ok(buf)
        }
    }

    /// Starts writing `data` at `offset` (`rbd_aio_write`).
    pub(super) fn aio_write(
        &self,
        data: Bytes,
        offset: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (len, ptr, handle) = (data.len(), data.as_ptr(), self.handle);
        // SAFETY: one rbd_aio_write on this open image (kept open by `inflight` until the callback); the
        // request owns `data`, whose bytes stay at their address while it lives.
        let request =
            unsafe { aio::submit(&self.inflight, data, |c| sys::rbd_aio_write(handle, offset, len, ptr.cast(), c)) };
        let spec = self.spec.clone();
        // Unlike `rbd_write`, a completed aio write reports 0, not the byte count.
        async move { aio::finish(request, "rbd_aio_write", spec).await.map(drop) }
    }

    /// Starts a flush of every completed write (`rbd_aio_flush`).
    pub(super) fn aio_flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let handle = self.handle;
        // SAFETY: one rbd_aio_flush on this open image (kept open by `inflight` until the callback).
        let request = unsafe { aio::submit(&self.inflight, (), |c| sys::rbd_aio_flush(handle, c)) };
        let spec = self.spec.clone();
        async move { aio::finish(request, "rbd_aio_flush", spec).await.map(drop) }
    }

    /// Writes `buf` at `offset`.
    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        // SAFETY: open image; `buf` is valid for `buf.len()` bytes of reads for the whole (synchronous) call.
        let rc = unsafe { sys::rbd_write(self.handle, offset, buf.len(), buf.as_ptr().cast()) };
        let done = check_len(rc, "rbd_write", &self.spec)?;
        short("write", offset, done, buf.len())
    }

    /// Zeroes a range: `thick` writes zeroes (keeps it allocated), otherwise
    /// librbd deallocates whole objects and zeroes the partial ones, whatever
    /// `rbd_discard_granularity_bytes` says.
    pub(super) fn write_zeroes(&self, offset: u64, length: u64, thick: bool) -> Result<(), StoreError> {
        let len = usize::try_from(length).map_err(|_| error("rbd_write_zeroes", &self.spec, -libc::EINVAL))?;
        let flags = if thick { sys::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION } else { 0 };
        let flags = c_int::try_from(flags).unwrap_or(0);
        // SAFETY: open image; no memory is passed.
        let rc = unsafe { sys::rbd_write_zeroes(self.handle, offset, len, flags, 0) };
        check_len(rc, "rbd_write_zeroes", &self.spec).map(drop)
    }

    /// Makes every completed write durable.
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        // SAFETY: open image.
        let rc = unsafe { sys::rbd_flush(self.handle) };
        check(rc, "rbd_flush", &self.spec).map(drop)
    }

    /// Ranges in `offset..offset+length` that differ from snapshot `from`
    /// (None: from nothing, i.e. allocation), sorted by offset; byte-granular
    /// where the OSD can tell (`whole_object = 0`). `include_parent` adds the
    /// parent's data where the image still reads from it.
    pub(super) fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        length: u64,
        include_parent: bool,
    ) -> Result<Vec<DiffExtent>, StoreError> {
        let c_from = from.map(|s| cstring(s, "rbd_diff_iterate2", &self.spec)).transpose()?;
        let from_ptr = c_from.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let out: Mutex<Vec<DiffExtent>> = Mutex::new(Vec::new());
        let arg = ptr::from_ref(&out).cast_mut().cast::<c_void>();
        // SAFETY: open image; `from_ptr` is NULL or a live C string; `diff_extent` matches the callback
        // type and only uses `arg` as the `Mutex` above, which outlives the call (librbd calls back only
        // before `rbd_diff_iterate2` returns, possibly from its own threads, hence the Mutex).
        let rc = unsafe {
            sys::rbd_diff_iterate2(
                self.handle,
                from_ptr,
                offset,
                length,
                include_parent.into(),
                0,
                Some(diff_extent),
                arg,
            )
        };
        check(
            rc,
            "rbd_diff_iterate2",
            &from.map_or_else(|| self.spec.clone(), |f| format!("{} since {f}", self.spec)),
        )?;
        let mut extents = out.into_inner().unwrap_or_else(|p| p.into_inner());
        extents.sort_by_key(|e| e.offset);
        Ok(extents)
    }

    /// The image id (stable for the life of the image; a re-created image gets a new one).
    pub(super) fn id(&self) -> Result<String, StoreError> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: open image; `buf` is valid for `buf.len()` bytes of writes.
            let rc = unsafe { sys::rbd_get_id(self.handle, buf.as_mut_ptr().cast(), buf.len()) };
            if rc == -libc::ERANGE && buf.len() < 1 << 16 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            check(rc, "rbd_get_id", &self.spec)?;
            let id = CStr::from_bytes_until_nul(&buf).map_err(|_| error("rbd_get_id", &self.spec, -libc::ERANGE))?;
            return Ok(id.to_string_lossy().into_owned());
        }
    }

    /// Last modification time, ns since the epoch. librbd updates it at most
    /// every `rbd_mtime_update_interval` (60 s by default).
    pub(super) fn modify_timestamp_ns(&self) -> Result<u64, StoreError> {
        let mut ts = sys::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: open image; valid out-pointer.
        let rc = unsafe { sys::rbd_get_modify_timestamp(self.handle, &mut ts) };
        check(rc, "rbd_get_modify_timestamp", &self.spec)?;
        Ok(super::snap::timespec_ns(&ts))
    }

    /// Changes the size (shrinking discards the tail).
    pub(super) fn resize(&self, size: u64) -> Result<(), StoreError> {
        // SAFETY: open image.
        let rc = unsafe { sys::rbd_resize(self.handle, size) };
        check(rc, "rbd_resize", &self.spec).map(drop)
    }

    /// The snapshot this image (or this snapshot view) is layered on.
    pub(super) fn parent(&self) -> Result<Option<ParentSpec>, StoreError> {
        // SAFETY: all-zero is a valid value of these plain C structs (integers, NULL pointers, false).
        let (mut image, mut snap) =
            unsafe { (std::mem::zeroed::<sys::rbd_linked_image_spec_t>(), std::mem::zeroed::<sys::rbd_snap_spec_t>()) };
        // SAFETY: open image; valid out-pointers.
        let rc = unsafe { sys::rbd_get_parent(self.handle, &mut image, &mut snap) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(rc, "rbd_get_parent", &self.spec)?;
        // SAFETY: on success librbd filled both specs with strings it allocated; they are read before the
        // cleanups below free them, and each cleanup runs exactly once.
        let parent = unsafe {
            let parent =
                ParentSpec { pool: c_text(image.pool_name), image: c_text(image.image_name), snap: c_text(snap.name) };
            sys::rbd_linked_image_spec_cleanup(&mut image);
            sys::rbd_snap_spec_cleanup(&mut snap);
            parent
        };
        Ok(Some(parent))
    }

    /// Copies every parent block into the image and detaches it; calls
    /// `progress(done, total)` on this thread as librbd reports progress
    /// (librbd reports from its own threads, so the report is forwarded).
    pub(super) fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel::<(u64, u64)>();
        let rc = std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let arg = ptr::from_ref(&tx).cast_mut().cast::<c_void>();
                // SAFETY: open image (shared with this scoped thread: `Image` is Sync); `report_progress`
                // matches librbd's callback type and uses `arg` only as the `Sender` above, which lives
                // until the call returns.
                unsafe { sys::rbd_flatten_with_progress(self.handle, Some(report_progress), arg) }
            });
            for (done, total) in rx {
                progress(done, total);
            }
            worker.join().unwrap_or(-libc::EIO)
        });
        check(rc, "rbd_flatten_with_progress", &self.spec).map(drop)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Abandoned asynchronous requests still reference the handle until their callback ran.
        self.inflight.wait_idle();
        // SAFETY: the handle came from a successful open and is closed only here; no call on it can be
        // running (Drop has exclusive access); the IO context and cluster outlive it (fields drop after).
        let rc = unsafe { sys::rbd_close(self.handle) };
        if rc < 0 {
            tracing::warn!(image = %self.spec, errno = -rc, "rbd_close failed");
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("spec", &self.spec).finish()
    }
}

/// An error unless a read/write moved all `want` bytes.
fn short(op: &'static str, offset: u64, done: usize, want: usize) -> Result<(), StoreError> {
    if done == want {
        return Ok(());
    }
    let source = io::Error::new(io::ErrorKind::UnexpectedEof, format!("short {op}: {done} of {want} bytes"));
    Err(StoreError::Io { op, offset, source })
}

/// `rbd_diff_iterate2` callback: appends to the `Mutex<Vec<DiffExtent>>` at `arg`.
unsafe extern "C" fn diff_extent(offset: u64, length: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&Mutex<Vec<DiffExtent>>` that `Image::diff` passed; it outlives the call.
    let out = unsafe { &*arg.cast::<Mutex<Vec<DiffExtent>>>() };
    let length = u64::try_from(length).unwrap_or(u64::MAX);
    out.lock().unwrap_or_else(|p| p.into_inner()).push(DiffExtent { offset, length, exists: exists != 0 });
    0
}

/// `rbd_flatten_with_progress` callback: forwards to the `Sender` at `arg`.
unsafe extern "C" fn report_progress(done: u64, total: u64, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&Sender` that `Image::flatten` passed; it outlives the call. `Sender` is Sync.
    let tx = unsafe { &*arg.cast::<mpsc::Sender<(u64, u64)>>() };
    // The receiver only goes away if the caller's progress function panicked; keep flattening.
    let _ = tx.send((done, total));
    0
}
