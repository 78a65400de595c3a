//! librbd: snapshots, children of a snapshot, and image metadata of an open [`Image`].

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int};

use rbd_sys as sys;

use super::error::{check, cstring, error};
use super::image::Image;
use super::rados::c_text;
use crate::store::{SnapshotInfo, StoreError};

/// Metadata keys fetched per `rbd_metadata_list` call.
const META_PAGE: u64 = 256;

impl Image {
    /// `pool/image@snap`, for errors about a snapshot.
    fn snap_target(&self, snap: &str) -> String {
        format!("{}@{snap}", self.spec())
    }

    /// Creates snapshot `name` of the current content.
    pub(super) fn snap_create(&self, name: &str) -> Result<(), StoreError> {
        let target = self.snap_target(name);
        let c_name = cstring(name, "rbd_snap_create", &target)?;
        // SAFETY: open image; NUL-terminated name that outlives the call.
        let rc = unsafe { sys::rbd_snap_create(self.raw(), c_name.as_ptr()) };
        check(rc, "rbd_snap_create", &target).map(drop)
    }

    /// Removes snapshot `name` (librbd moves one with clone-v2 children to
    /// the trash namespace instead; callers check children first).
    pub(super) fn snap_remove(&self, name: &str) -> Result<(), StoreError> {
        let target = self.snap_target(name);
        let c_name = cstring(name, "rbd_snap_remove", &target)?;
        // SAFETY: open image; NUL-terminated name that outlives the call.
        let rc = unsafe { sys::rbd_snap_remove(self.raw(), c_name.as_ptr()) };
        check(rc, "rbd_snap_remove", &target).map(drop)
    }

    /// User snapshots, oldest (lowest id) first.
    pub(super) fn snap_list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut max: c_int = 16;
        loop {
            // SAFETY: all-zero is a valid `rbd_snap_info_t` (integers and a NULL pointer).
            let mut buf =
                vec![unsafe { std::mem::zeroed::<sys::rbd_snap_info_t>() }; usize::try_from(max).unwrap_or(1)];
            // SAFETY: open image; `buf` has `max` entries (librbd writes at most the count plus a terminator).
            let rc = unsafe { sys::rbd_snap_list(self.raw(), buf.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue; // `max` now holds the size needed
            }
            let count = usize::try_from(check(rc, "rbd_snap_list", self.spec())?).unwrap_or(0);
            let mut snaps: Vec<SnapshotInfo> = buf[..count.min(buf.len())]
                .iter()
                // SAFETY: librbd filled the first `count` entries with live strings (freed below).
                .map(|s| SnapshotInfo { name: unsafe { c_text(s.name) }, id: s.id, size: s.size })
                .collect();
            // SAFETY: `buf` was filled by a successful `rbd_snap_list`; freed once, after the names were copied.
            unsafe { sys::rbd_snap_list_end(buf.as_mut_ptr()) };
            snaps.sort_by_key(|s| s.id);
            return Ok(snaps);
        }
    }

    /// Creation time of snapshot `snap_id`, ns since the epoch.
    pub(super) fn snap_timestamp_ns(&self, snap_id: u64) -> Result<u64, StoreError> {
        let mut ts = sys::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: open image; valid out-pointer.
        let rc = unsafe { sys::rbd_snap_get_timestamp(self.raw(), snap_id, &mut ts) };
        check(rc, "rbd_snap_get_timestamp", self.spec())?;
        Ok(timespec_ns(&ts))
    }

    /// Images layered on the snapshot this handle is opened at (`pool/image`,
    /// including children in the trash).
    pub(super) fn children(&self) -> Result<Vec<String>, StoreError> {
        let mut max: usize = 8;
        loop {
            // SAFETY: all-zero is a valid `rbd_linked_image_spec_t` (integers, NULL pointers, false).
            let mut buf = vec![unsafe { std::mem::zeroed::<sys::rbd_linked_image_spec_t>() }; max.max(1)];
            max = buf.len();
            // SAFETY: open image; `buf` has `max` entries.
            let rc = unsafe { sys::rbd_list_children3(self.raw(), buf.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                continue;
            }
            check(rc, "rbd_list_children3", self.spec())?;
            let count = max.min(buf.len());
            let children = buf[..count]
                .iter()
                // SAFETY: librbd filled the first `count` entries with live strings (freed below).
                .map(|c| unsafe { format!("{}/{}", c_text(c.pool_name), c_text(c.image_name)) })
                .collect();
            // SAFETY: the first `count` entries were filled by librbd and are freed once, after copying.
            unsafe { sys::rbd_linked_image_spec_list_cleanup(buf.as_mut_ptr(), count) };
            return Ok(children);
        }
    }

    /// Value of metadata `key`, None if absent.
    pub(super) fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let c_key = cstring(key, "rbd_metadata_get", self.spec())?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: open image; NUL-terminated key; `buf` is valid for `len` bytes of writes.
            let rc = unsafe { sys::rbd_metadata_get(self.raw(), c_key.as_ptr(), buf.as_mut_ptr().cast(), &mut len) };
            match rc {
                rc if rc == -libc::ERANGE && len > buf.len() => buf.resize(len, 0),
                rc if rc == -libc::ENOENT => return Ok(None),
                rc => {
                    check(rc, "rbd_metadata_get", &format!("{} key {key}", self.spec()))?;
                    return Ok(Some(until_nul(&buf)));
                }
            }
        }
    }

    /// Sets metadata `key` (stored in the image header object: durable on return).
    pub(super) fn meta_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let target = format!("{} key {key}", self.spec());
        let c_key = cstring(key, "rbd_metadata_set", &target)?;
        let c_value = cstring(value, "rbd_metadata_set", &target)?;
        // SAFETY: open image; NUL-terminated strings that outlive the call.
        let rc = unsafe { sys::rbd_metadata_set(self.raw(), c_key.as_ptr(), c_value.as_ptr()) };
        check(rc, "rbd_metadata_set", &target).map(drop)
    }

    /// Removes metadata `key`; absent is fine.
    pub(super) fn meta_remove(&self, key: &str) -> Result<(), StoreError> {
        let target = format!("{} key {key}", self.spec());
        let c_key = cstring(key, "rbd_metadata_remove", &target)?;
        // SAFETY: open image; NUL-terminated key that outlives the call.
        let rc = unsafe { sys::rbd_metadata_remove(self.raw(), c_key.as_ptr()) };
        if rc == -libc::ENOENT {
            return Ok(());
        }
        check(rc, "rbd_metadata_remove", &target).map(drop)
    }

    /// Every metadata key and value (including librbd's own `conf_*` overrides).
    pub(super) fn meta_list(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let mut all = BTreeMap::new();
        let mut start = String::new();
        loop {
            let page = self.meta_page(&start)?;
            let full = u64::try_from(page.len()).unwrap_or(0) >= META_PAGE;
            match page.last() {
                Some((key, _)) if full => start.clone_from(key),
                _ => {
                    all.extend(page);
                    return Ok(all);
                }
            }
            all.extend(page);
        }
    }

    /// Up to [`META_PAGE`] pairs with keys after `start` ("" = from the first).
    fn meta_page(&self, start: &str) -> Result<Vec<(String, String)>, StoreError> {
        let c_start = cstring(start, "rbd_metadata_list", self.spec())?;
        let (mut keys, mut values) = (vec![0u8; 4096], vec![0u8; 4096]);
        loop {
            let (mut keys_len, mut values_len) = (keys.len(), values.len());
            // SAFETY: open image; NUL-terminated start key; both buffers are valid for their lengths.
            let rc = unsafe {
                sys::rbd_metadata_list(
                    self.raw(),
                    c_start.as_ptr(),
                    META_PAGE,
                    keys.as_mut_ptr().cast::<c_char>(),
                    &mut keys_len,
                    values.as_mut_ptr().cast::<c_char>(),
                    &mut values_len,
                )
            };
            if rc == -libc::ERANGE && (keys_len > keys.len() || values_len > values.len()) {
                keys.resize(keys_len.max(keys.len()), 0);
                values.resize(values_len.max(values.len()), 0);
                continue;
            }
            check(rc, "rbd_metadata_list", self.spec())?;
            let keys = split_nul(&keys[..keys_len.min(keys.len())]);
            let values = split_nul(&values[..values_len.min(values.len())]);
            if keys.len() != values.len() {
                return Err(error("rbd_metadata_list", self.spec(), -libc::EIO));
            }
            return Ok(keys.into_iter().zip(values).collect());
        }
    }
}

/// A `timespec` as ns since the epoch (0 before it).
pub(super) fn timespec_ns(ts: &sys::timespec) -> u64 {
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The text before the first NUL.
fn until_nul(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `a\0b\0` → `["a", "b"]` (every entry ends in a NUL, so `\0` is one empty entry).
fn split_nul(buf: &[u8]) -> Vec<String> {
    let mut parts: Vec<String> = buf.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    parts.pop(); // the empty remainder after the last NUL
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_separated_lists() {
        assert_eq!(split_nul(b"a\0bc\0"), vec!["a", "bc"]);
        assert_eq!(split_nul(b"\0"), vec![""]);
        assert_eq!(split_nul(b""), Vec::<String>::new());
        assert_eq!(split_nul(b"\0x\0"), vec!["", "x"]);
        assert_eq!(until_nul(b"abc\0def"), "abc");
    }

    #[test]
    fn null_pointer_text_is_empty() {
        // SAFETY: NULL is allowed.
        assert_eq!(unsafe { c_text(std::ptr::null()) }, "");
    }
}
