//! librbd asynchronous IO (`rbd_aio_*`) as futures.
//!
//! Each request owns its buffer in a heap [`Pending`] that librbd's
//! completion callback takes back: the callback reads the result, releases
//! the completion and sends `(result, buffer)` through a oneshot channel. A
//! dropped future only drops the receiver; the buffer stays alive until
//! librbd is done with it, and is freed in the callback. No thread waits
//! per request (the synchronous `rbd_read`/`rbd_write` park the calling
//! thread on a condition variable that librbd's completion thread signals).
//!
//! [`InFlight`] counts submitted requests whose callback has not finished;
//! [`Image`](super::image::Image) waits for it to reach zero before
//! `rbd_close`, so a callback never runs against a closed image and the
//! image is never closed from inside a callback.

use std::ffi::c_void;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex};

use rbd_sys as sys;
use tokio::sync::oneshot;

use super::error::{check_len, error};
use crate::store::StoreError;

/// Requests submitted and not yet called back.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> Arc<Self> {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.clone()
    }

    fn leave(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until every submitted request was called back.
    pub(super) fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a request's callback owns: its buffer and where to send the result.
struct Pending<B> {
    buffer: B,
    done: oneshot::Sender<(isize, B)>,
    inflight: Arc<InFlight>,
}

/// `rbd_callback_t`: takes the [`Pending`] back, reports, releases.
unsafe extern "C" fn complete<B>(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Pending<B>>` leaked by `submit` for this completion; librbd calls back
    // exactly once per completion, so the box is reclaimed exactly once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending<B>>()) };
    // SAFETY: `c` is the completion being called back; it is released once, here, after its value was read
    // (librbd holds its own reference until the callback returns, as QEMU's block/rbd.c relies on too).
    let rc = unsafe {
        let rc = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        rc
    };
    let Pending { buffer, done, inflight } = *pending;
    // A dropped receiver (the request was abandoned) just frees the buffer here.
    let _ = done.send((rc, buffer));
    inflight.leave();
}

/// Submits one request now: `start(completion)` issues the librbd call,
/// with pointers into `buffer`'s heap storage taken before the call (the
/// storage does not move when `buffer` moves into the request; the
/// callback may even run before `start` returns). The returned receiver yields the
/// result code and the buffer once librbd completed the request; it holds
/// nothing of the image (which [`InFlight`] keeps open meanwhile).
///
/// # Safety
/// `start` must issue exactly one `rbd_aio_*` call on a live image with the
/// given completion and return its result; any pointer it passes must lie
/// within `buffer`'s heap storage (which the request keeps alive and in
/// place until the callback).
pub(super) unsafe fn submit<B: Send + 'static>(
    inflight: &Arc<InFlight>,
    buffer: B,
    start: impl FnOnce(sys::rbd_completion_t) -> std::ffi::c_int,
) -> Receiver<B> {
    let (done, result) = oneshot::channel();
    let pending = Box::new(Pending { buffer, done, inflight: inflight.enter() });
    let arg = Box::into_raw(pending).cast::<c_void>();
    let mut c: sys::rbd_completion_t = ptr::null_mut();
    // SAFETY: `arg` is a valid pointer that the callback reclaims; `complete::<B>` matches `rbd_callback_t`.
    let rc = unsafe { sys::rbd_aio_create_completion(arg, Some(complete::<B>), &mut c) };
    if rc < 0 {
        // SAFETY: no completion exists, so no callback will run: the box is still ours.
        let pending = unsafe { Box::from_raw(arg.cast::<Pending<B>>()) };
        pending.inflight.leave();
        let _ = pending.done.send((isize::try_from(rc).unwrap_or(-5), pending.buffer));
        return result;
    }
    // From here on the callback owns the `Pending`; nothing here touches it again.
    let rc = start(c);
    if rc < 0 {
        // librbd (16.x) never fails a submission; should it, whether the callback still runs is not
        // specified, so the `Pending` (and the buffer librbd might still use) is deliberately leaked
        // rather than freed twice, and the error goes nowhere but the log.
        tracing::error!(rc, "rbd_aio submission failed; leaking its buffer");
    }
    result
}

/// Yields a submitted request's result code and buffer.
pub(super) type Receiver<B> = oneshot::Receiver<(isize, B)>;

/// Waits for a submitted request: `Ok((bytes, buffer))` or the mapped error.
pub(super) async fn finish<B>(
    request: Receiver<B>,
    op: &'static str,
    target: String,
) -> Result<(usize, B), StoreError> {
    match request.await {
        Ok((rc, buffer)) => check_len(rc, op, &target).map(|n| (n, buffer)),
        Err(_) => Err(error(op, &target, -libc::EIO)),
    }
}
