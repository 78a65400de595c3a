//! Snapshots of `file:` images: frozen copies in `IMAGE.snapshots/NAME.raw`
//! (reflinked where the filesystem can, otherwise a sparse copy of the
//! allocated extents), recorded in the sidecar; children layered on a
//! snapshot are recorded there too, so a snapshot in use cannot be removed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sidecar::{self, SnapRecord};
use super::{io_err, FileStore};
use crate::config::{check_name, ImageUri};
use crate::store::{BlockStore, ExtentKind, StoreError};

/// `IMAGE.snapshots`.
pub fn dir_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".snapshots");
    PathBuf::from(p)
}

fn data_of(image: &Path, name: &str) -> PathBuf {
    dir_of(image).join(format!("{name}.raw"))
}

fn uri(image: &Path, snap: &str) -> String {
    format!("file:{}@{snap}", image.display())
}

/// Takes snapshot `name` (the caller holds the image's write gate and flushed).
pub(super) fn create(store: &FileStore, name: &str) -> Result<(), StoreError> {
    check_name(name).map_err(|e| StoreError::Corrupt(uri(&store.path, name), e))?;
    if store.layer.load().is_some() {
        return Err(StoreError::Unsupported("snapshots of a layered file: image (stream it first)"));
    }
    if store.sidecar()?.snapshots.iter().any(|s| s.name == name) {
        return Err(StoreError::Exists(uri(&store.path, name)));
    }
    let dir = dir_of(&store.path);
    std::fs::create_dir_all(&dir).map_err(io_err("snapshot", 0))?;
    let target = data_of(&store.path, name);
    let tmp = target.with_extension("raw.tmp");
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("snapshot", 0))?;
    copy_into(store, &out)?;
    out.sync_all().map_err(io_err("snapshot", 0))?;
    std::fs::rename(&tmp, &target).map_err(io_err("snapshot", 0))?;
    sidecar::sync_dir(&target).map_err(io_err("snapshot", 0))?;
    let size = store.size();
    store.edit_sidecar(|s| {
        s.snapshots.push(SnapRecord { name: name.to_owned(), id: s.next_id, size });
        s.next_id += 1;
    })
}

/// Reflink (FICLONE) when possible, else copy the allocated extents.
fn copy_into(store: &FileStore, out: &File) -> Result<(), StoreError> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open and owned here.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, store.file.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    out.set_len(store.size()).map_err(io_err("snapshot", 0))?;
    let mut buf = vec![0u8; 1 << 20];
    for e in store.own_extents(0, store.size())?.into_iter().filter(|e| e.kind == ExtentKind::Data) {
        let mut pos = e.offset;
        while pos < e.offset + e.length {
            let n = usize::try_from((e.offset + e.length - pos).min(buf.len() as u64)).unwrap_or(0);
            store.file.read_exact_at(&mut buf[..n], pos).map_err(io_err("snapshot read", pos))?;
            out.write_all_at(&buf[..n], pos).map_err(io_err("snapshot write", pos))?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Removes snapshot `name`, unless a child is layered on it.
pub(super) fn remove(store: &FileStore, name: &str) -> Result<(), StoreError> {
    let sidecar = store.sidecar()?;
    if !sidecar.snapshots.iter().any(|s| s.name == name) {
        return Err(StoreError::NotFound(uri(&store.path, name)));
    }
    let users: Vec<&str> =
        sidecar.children.iter().filter(|c| c.ends_with(&format!(" {name}"))).map(|c| c.as_str()).collect();
    if !users.is_empty() {
        return Err(StoreError::Busy(uri(&store.path, name), format!("children layered on it: {users:?}")));
    }
    store.edit_sidecar(|s| s.snapshots.retain(|x| x.name != name))?;
    let path = data_of(&store.path, name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err("remove snapshot", 0)(e)),
        _ => {}
    }
    sidecar::sync_dir(&path).map_err(io_err("remove snapshot", 0))
}

/// A read-only view of snapshot `name`.
pub(super) fn open(store: &FileStore, name: &str) -> Result<Arc<dyn BlockStore>, StoreError> {
    if !store.sidecar()?.snapshots.iter().any(|s| s.name == name) {
        return Err(StoreError::NotFound(uri(&store.path, name)));
    }
    let data = data_of(&store.path, name);
    let view =
        FileStore::open_file(&data, &store.path, Some((store.path.clone(), name.to_owned())), true, &store.stores)?;
    Ok(Arc::new(view))
}

/// Ranges of own data that may differ from snapshot `since` (None: allocated own data).
pub(super) fn changed_extents(
    store: &FileStore,
    since: Option<&str>,
    offset: u64,
    length: u64,
) -> Result<Vec<(u64, u64)>, StoreError> {
    let own = match store.layer.load().as_ref() {
        Some(layer) => layer.owned_ranges(offset, length),
        None => store
            .own_extents(offset, length)?
            .into_iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| (e.offset, e.length))
            .collect(),
    };
    let Some(since) = since else { return Ok(own) };
    let base = open(store, since)?;
    let mut candidates = own;
    candidates.extend(
        base.extents(offset, length)?.into_iter().filter(|e| e.kind == ExtentKind::Data).map(|e| (e.offset, e.length)),
    );
    candidates.sort_unstable();
    let size = store.size().min(base.size());
    let mut out: Vec<(u64, u64)> = Vec::new();
    const CHUNK: u64 = 64 << 10;
    let (mut a, mut b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut checked_to = 0;
    for (start, len) in candidates {
        let mut pos = (start / CHUNK * CHUNK).max(checked_to);
        let end = (start + len).min(size);
        while pos < end {
            let n = CHUNK.min(size - pos);
            let k = usize::try_from(n).unwrap_or(0);
            store.read_at(&mut a[..k], pos)?;
            base.read_at(&mut b[..k], pos)?;
            if a[..k] != b[..k] {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == pos => last.1 += n,
                    _ => out.push((pos, n)),
                }
            }
            pos += n;
        }
        checked_to = checked_to.max(pos);
    }
    if store.size() > base.size() {
        out.push((base.size(), store.size() - base.size()));
    }
    Ok(out)
}

/// Records (`add`) or forgets a child layered on a `file:` parent snapshot.
pub(super) fn register_child(parent: &ImageUri, child: &Path, add: bool) -> Result<(), StoreError> {
    let ImageUri::File { path, snap: Some(snap) } = parent else { return Ok(()) };
    let entry = format!("file:{} {snap}", child.display());
    sidecar::edit(path, |s| {
        s.children.retain(|c| c != &entry);
        if add {
            s.children.push(entry);
        }
    })
}
