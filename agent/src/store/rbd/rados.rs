//! librados: the cluster connection ([`Cluster`]) and pool IO contexts ([`IoCtx`]).
//!
//! Ownership: an [`IoCtx`] holds an `Arc<Cluster>`, so the cluster is shut
//! down only after its last IO context (and, through `Image`, its last open
//! image) is gone. Each handle is released exactly once, in `Drop`.

use std::ffi::{c_void, CStr};
use std::path::Path;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use rados_sys as sys;

use super::error::{ceph_error, check, cstring};
use crate::store::StoreError;

/// A connected cluster handle (`rados_t`).
pub(super) struct Cluster {
    handle: sys::rados_t,
    /// `client.NAME@CONF`, for error messages.
    target: String,
}

// SAFETY: `rados_t` points to librados' `RadosClient`, which locks its own
// state; librados allows its cluster calls (ioctx creation, pool lookup)
// from any thread. The handle is not reconfigured after `connect` returns,
// and `rados_shutdown` runs only in `Drop`, which has exclusive access.
unsafe impl Send for Cluster {}
// SAFETY: see `Send`: the only `&self` use is `rados_ioctx_create`, which
// librados serialises internally.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Creates a handle for `client.{client}`, reads `conf`, sets the
    /// keyring and every timeout to `timeout` (whole seconds, at least 1),
    /// then connects. Fails within about `timeout` if no monitor answers or
    /// authentication fails.
    pub(super) fn connect(
        conf: &Path,
        client: &str,
        keyring: Option<&Path>,
        timeout: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let target = format!("client.{client}@{}", conf.display());
        let name = cstring(&format!("client.{client}"), "rados_create2", &target)?;
        let mut handle: sys::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; both strings are NUL-terminated and outlive the call.
        let rc = unsafe { sys::rados_create2(&mut handle, c"ceph".as_ptr(), name.as_ptr(), 0) };
        check(rc, "rados_create2", &target)?;
        // From here on `Drop` shuts the handle down, on every error path too.
        let cluster = Self { handle, target };
        cluster.read_conf(conf)?;
        if let Some(keyring) = keyring {
            cluster.set("keyring", &keyring.to_string_lossy())?;
        }
        let secs = timeout.as_secs().max(1).to_string();
        for option in ["rados_mon_op_timeout", "rados_osd_op_timeout", "client_mount_timeout"] {
            cluster.set(option, &secs)?;
        }
        // No librbd cache, as QEMU runs librbd with `cache=none` (Proxmox's
        // default for RBD disks): the guest's page cache is the cache, and
        // librbd's copies every written byte (measured: half the CPU of a
        // 4 MiB write). Writes are durable in Ceph when acknowledged.
        cluster.set("rbd_cache", "false")?;
        // Zero-copy aio writes: librbd sends our buffer instead of a copy.
        // The copy guards callers that change a buffer while it is in
        // flight (a guest's memory under QEMU); ours are immutable `Bytes`
        // that the request owns until librbd calls back, and librbd calls
        // back only after it released the buffer. Synchronous writes copy
        // either way.
        // An option older librbd lacks: without it writes are copied, as before.
        if let Err(e) = cluster.set("rbd_disable_zero_copy_writes", "false") {
            tracing::debug!(error = %e, "librbd has no rbd_disable_zero_copy_writes; aio writes are copied");
        }
        // SAFETY: the handle is valid and configured, and not yet connected.
        let rc = unsafe { sys::rados_connect(cluster.handle) };
        if rc < 0 {
            let error = ceph_error("rados_connect", &cluster.target, -rc);
            // After a failed (often timed-out) connect, librados may still
            // run threads of that attempt; `rados_shutdown` racing them
            // aborts the whole process (`std::system_error`, seen in CI;
            // Ceph's own CLI skips shutdown after a failed connect for the
            // same reason, tracker 44526). So the handle is leaked: a few
            // threads and some memory per failed connect, which only
            // happens on misconfiguration or an unreachable cluster.
            std::mem::forget(cluster);
            return Err(error);
        }
        Ok(Arc::new(cluster))
    }

    /// `client.NAME@CONF`.
    pub(super) fn target(&self) -> &str {
        &self.target
    }

    fn read_conf(&self, conf: &Path) -> Result<(), StoreError> {
        let path = cstring(&conf.to_string_lossy(), "rados_conf_read_file", &self.target)?;
        // SAFETY: valid, unconnected handle; NUL-terminated path that outlives the call.
        let rc = unsafe { sys::rados_conf_read_file(self.handle, path.as_ptr()) };
        if rc < 0 {
            let source = std::io::Error::from_raw_os_error(-rc);
            return Err(StoreError::Open { path: conf.to_owned(), source });
        }
        Ok(())
    }

    fn set(&self, option: &str, value: &str) -> Result<(), StoreError> {
        let target = format!("{} ({option})", self.target);
        let c_option = cstring(option, "rados_conf_set", &target)?;
        let c_value = cstring(value, "rados_conf_set", &target)?;
        // SAFETY: valid, unconnected handle (conf_set before connect is always allowed); both strings outlive the call.
        let rc = unsafe { sys::rados_conf_set(self.handle, c_option.as_ptr(), c_value.as_ptr()) };
        if rc < 0 {
            return Err(ceph_error("rados_conf_set", &target, -rc));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful `rados_create2` and is shut
        // down only here, once; every IoCtx (holding an Arc to us) is gone.
        // `rados_shutdown` also frees a handle that never connected.
        unsafe { sys::rados_shutdown(self.handle) }
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("target", &self.target).finish()
    }
}

/// An IO context on one pool (`rados_ioctx_t`); keeps its cluster alive.
pub(super) struct IoCtx {
    handle: sys::rados_ioctx_t,
    pool: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados IO contexts may be used for IO from several threads at
// once; only changing their settings (snapshot to read, namespace, locator)
// is unsynchronised, and this type never changes them after creation. librbd
// duplicates the context for every image it opens, so images do not share
// our settings either. Destruction happens once, in `Drop`.
unsafe impl Send for IoCtx {}
// SAFETY: see `Send`; `&self` only hands the (never reconfigured) handle to librbd calls.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Opens pool `pool`; a missing pool is [`StoreError::NotFound`].
    pub(super) fn create(cluster: &Arc<Cluster>, pool: &str) -> Result<Self, StoreError> {
        let target = format!("pool {pool}");
        let c_pool = cstring(pool, "rados_ioctx_create", &target)?;
        let mut handle: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected cluster handle (kept alive by the Arc); valid out-pointer; NUL-terminated name.
        let rc = unsafe { sys::rados_ioctx_create(cluster.handle, c_pool.as_ptr(), &mut handle) };
        check(rc, "rados_ioctx_create", &target)?;
        Ok(Self { handle, pool: pool.to_owned(), _cluster: cluster.clone() })
    }

    /// The raw handle, for librbd calls (`rados_ioctx_t` is `void *` in both libraries).
    pub(super) fn raw(&self) -> *mut c_void {
        self.handle
    }

    /// Pool name.
    pub(super) fn pool(&self) -> &str {
        &self.pool
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful `rados_ioctx_create` and is destroyed only here;
        // images opened on it hold an Arc to us, so none is open; the cluster is still connected.
        unsafe { sys::rados_ioctx_destroy(self.handle) }
    }
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx").field("pool", &self.pool).finish()
    }
}

/// The text of a C string owned by librbd (lossy UTF-8; empty for NULL).
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid for the call.
pub(super) unsafe fn c_text(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-NULL, and the caller guarantees a live NUL-terminated string.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}
