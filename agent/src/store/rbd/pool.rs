//! librbd calls on a pool: create, clone, remove and list images.

use std::ffi::c_uint;
use std::ptr;

use rbd_sys as sys;

use super::error::{check, cstring};
use super::image::spec;
use super::rados::{c_text, IoCtx};
use crate::store::StoreError;

/// Object size of created images: 2^22 = 4 MiB (librbd's default, made explicit).
pub(super) const ORDER: u64 = 22;
/// Clone format 2: children of unprotected snapshots (needs `require_min_compat_client >= mimic`).
const CLONE_FORMAT: u64 = 2;

/// `rbd_image_options_t`, destroyed once in `Drop`.
struct ImageOptions(sys::rbd_image_options_t);

impl ImageOptions {
    fn new() -> Self {
        let mut opts: sys::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; librbd allocates the options object.
        unsafe { sys::rbd_image_options_create(&mut opts) };
        Self(opts)
    }

    fn set(&self, option: c_uint, value: u64, target: &str) -> Result<(), StoreError> {
        let option = std::ffi::c_int::try_from(option).unwrap_or(-1);
        // SAFETY: live options object; plain integers.
        let rc = unsafe { sys::rbd_image_options_set_uint64(self.0, option, value) };
        check(rc, "rbd_image_options_set_uint64", target).map(drop)
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by `rbd_image_options_create`, destroyed only here.
        unsafe { sys::rbd_image_options_destroy(self.0) }
    }
}

/// Creates image `name` of `size` bytes with 4 MiB objects; features come
/// from the cluster's `rbd_default_features`.
pub(super) fn create(ioctx: &IoCtx, name: &str, size: u64) -> Result<(), StoreError> {
    let target = spec(ioctx.pool(), name, None);
    let c_name = cstring(name, "rbd_create4", &target)?;
    let opts = ImageOptions::new();
    opts.set(sys::RBD_IMAGE_OPTION_ORDER, ORDER, &target)?;
    // SAFETY: live IO context and options; NUL-terminated name that outlives the call.
    let rc = unsafe { sys::rbd_create4(ioctx.raw(), c_name.as_ptr(), size, opts.0) };
    check(rc, "rbd_create4", &target).map(drop)
}

/// Creates `child` layered on `parent_image@parent_snap` (clone v2: the
/// snapshot needs no protection).
pub(super) fn clone(
    parent: &IoCtx,
    parent_image: &str,
    parent_snap: &str,
    child: &IoCtx,
    child_image: &str,
) -> Result<(), StoreError> {
    let target = format!(
        "{} from {}",
        spec(child.pool(), child_image, None),
        spec(parent.pool(), parent_image, Some(parent_snap))
    );
    let c_parent = cstring(parent_image, "rbd_clone3", &target)?;
    let c_snap = cstring(parent_snap, "rbd_clone3", &target)?;
    let c_child = cstring(child_image, "rbd_clone3", &target)?;
    let opts = ImageOptions::new();
    opts.set(sys::RBD_IMAGE_OPTION_CLONE_FORMAT, CLONE_FORMAT, &target)?;
    // SAFETY: live IO contexts and options; NUL-terminated names that outlive the call.
    let rc = unsafe {
        sys::rbd_clone3(parent.raw(), c_parent.as_ptr(), c_snap.as_ptr(), child.raw(), c_child.as_ptr(), opts.0)
    };
    match check(rc, "rbd_clone3", &target) {
        // librbd says ENOENT for a missing parent image or snapshot: name the parent.
        Err(StoreError::NotFound(_)) => Err(StoreError::NotFound(spec(parent.pool(), parent_image, Some(parent_snap)))),
        // and EEXIST for an existing child.
        Err(StoreError::Exists(_)) => Err(StoreError::Exists(spec(child.pool(), child_image, None))),
        other => other.map(drop),
    }
}

/// Removes image `name`: refused (Busy) if it has snapshots or is open elsewhere.
pub(super) fn remove(ioctx: &IoCtx, name: &str) -> Result<(), StoreError> {
    let target = spec(ioctx.pool(), name, None);
    let c_name = cstring(name, "rbd_remove", &target)?;
    // SAFETY: live IO context; NUL-terminated name that outlives the call.
    let rc = unsafe { sys::rbd_remove(ioctx.raw(), c_name.as_ptr()) };
    match -rc {
        libc::ENOTEMPTY => Err(StoreError::Busy(target, "it has snapshots".into())),
        libc::EBUSY => Err(StoreError::Busy(target, "another client has it open".into())),
        _ => check(rc, "rbd_remove", &target).map(drop),
    }
}

/// Image names in the pool, sorted.
pub(super) fn list(ioctx: &IoCtx) -> Result<Vec<String>, StoreError> {
    let target = format!("pool {}", ioctx.pool());
    let mut max: usize = 64;
    loop {
        // SAFETY: all-zero is a valid `rbd_image_spec_t` (two NULL pointers).
        let mut buf = vec![unsafe { std::mem::zeroed::<sys::rbd_image_spec_t>() }; max.max(1)];
        max = buf.len();
        // SAFETY: live IO context; `buf` has `max` entries.
        let rc = unsafe { sys::rbd_list2(ioctx.raw(), buf.as_mut_ptr(), &mut max) };
        if rc == -libc::ERANGE {
            continue; // `max` now holds the count needed
        }
        check(rc, "rbd_list2", &target)?;
        let count = max.min(buf.len());
        // SAFETY: librbd filled the first `count` entries with live strings (freed below).
        let mut names: Vec<String> = buf[..count].iter().map(|s| unsafe { c_text(s.name) }).collect();
        // SAFETY: the first `count` entries were filled by librbd; freed once, after copying.
        unsafe { sys::rbd_image_spec_list_cleanup(buf.as_mut_ptr(), count) };
        names.sort();
        return Ok(names);
    }
}
