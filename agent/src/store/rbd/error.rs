//! librados/librbd return codes to [`StoreError`].
//!
//! Both libraries return `-errno` (or a non-negative count/length). One
//! mapping for all calls: `ENOENT` → [`StoreError::NotFound`], `EEXIST` →
//! [`StoreError::Exists`], `EBUSY`/`ENOTEMPTY` → [`StoreError::Busy`], any
//! other errno → [`StoreError::Ceph`] naming the C function and its target.

use std::ffi::{c_int, CString};
use std::io;

use crate::store::StoreError;

/// `Ok(rc)` for `rc >= 0`, else the mapped error.
pub(super) fn check(rc: c_int, op: &'static str, target: &str) -> Result<c_int, StoreError> {
    if rc >= 0 {
        Ok(rc)
    } else {
        Err(error(op, target, rc))
    }
}

/// Like [`check`] for the `ssize_t` results of read/write calls.
pub(super) fn check_len(rc: isize, op: &'static str, target: &str) -> Result<usize, StoreError> {
    usize::try_from(rc).map_err(|_| error(op, target, c_int::try_from(rc).unwrap_or(-libc::EIO)))
}

/// The error for return code `rc` (negative errno; a positive value is taken as the errno itself).
pub(super) fn error(op: &'static str, target: &str, rc: c_int) -> StoreError {
    let errno = rc.checked_abs().unwrap_or(libc::EIO);
    match errno {
        libc::ENOENT => StoreError::NotFound(target.to_owned()),
        libc::EEXIST => StoreError::Exists(target.to_owned()),
        libc::EBUSY | libc::ENOTEMPTY => StoreError::Busy(target.to_owned(), format!("{op}: {}", strerror(errno))),
        _ => ceph_error(op, target, errno),
    }
}

/// [`StoreError::Ceph`] without the errno mapping (for calls where, say,
/// `ENOENT` means "no keyring" rather than "no such image").
pub(super) fn ceph_error(op: &'static str, target: &str, errno: c_int) -> StoreError {
    StoreError::Ceph { op, target: target.to_owned(), errno, message: strerror(errno) }
}

/// A C string for a name passed to Ceph; an interior NUL is `EINVAL`.
pub(super) fn cstring(s: &str, op: &'static str, target: &str) -> Result<CString, StoreError> {
    CString::new(s).map_err(|_| StoreError::Ceph {
        op,
        target: target.to_owned(),
        errno: libc::EINVAL,
        message: "Name contains a NUL byte".into(),
    })
}

/// strerror text without the " (os error N)" suffix `io::Error` adds.
fn strerror(errno: c_int) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert!(matches!(error("rbd_open", "rbd/x", -libc::ENOENT), StoreError::NotFound(t) if t == "rbd/x"));
        assert!(matches!(error("rbd_create4", "rbd/x", -libc::EEXIST), StoreError::Exists(_)));
        assert!(matches!(error("rbd_remove", "rbd/x", -libc::ENOTEMPTY), StoreError::Busy(..)));
        assert!(matches!(error("rbd_snap_remove", "rbd/x@s", -libc::EBUSY), StoreError::Busy(..)));
        match error("rbd_write", "rbd/x", -libc::ETIMEDOUT) {
            StoreError::Ceph { op, errno, message, .. } => {
                assert_eq!((op, errno), ("rbd_write", libc::ETIMEDOUT));
                assert_eq!(message, "Connection timed out");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(check(3, "x", "y").unwrap(), 3);
        assert_eq!(check_len(4096, "x", "y").unwrap(), 4096);
        assert!(matches!(check_len(-5, "rbd_read", "y"), Err(StoreError::Ceph { errno: 5, .. })));
        assert!(cstring("a\0b", "rbd_open", "rbd/a").is_err());
    }
}
