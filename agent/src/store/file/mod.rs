//! The local store: raw sparse files, the embedded default for disks,
//! backup targets and migration overlays.
//!
//! ```text
//!   IMAGE              raw sparse data (pread/pwrite, fallocate, SEEK_HOLE, fdatasync)
//!   IMAGE.rbdsync      sidecar: parent, snapshots, children, metadata (atomic JSON)
//!   IMAGE.owned        layered images only: granules the child owns (layer.rs)
//!   IMAGE.snapshots/   NAME.raw (+ NAME.owned): frozen copies (reflink when the filesystem can)
//! ```
//! Semantics match the RBD store so jobs need not care which one they use.

mod layer;
pub(crate) mod sidecar;
mod snapshot;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use arc_swap::ArcSwapOption;

use self::layer::Layer;
use self::sidecar::Sidecar;
use super::{BlockStore, Capabilities, Extent, ExtentKind, Identity, OpenOptions, SnapshotInfo, StoreError, Stores};
use crate::config::ImageUri;

/// A raw image file, or a read-only view of one of its snapshots.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    read_only: bool,
    /// Some(name) for a snapshot view (`path` is then the frozen copy).
    snapshot_of: Option<(PathBuf, String)>,
    layer: ArcSwapOption<Layer>,
    /// Path whose sidecar holds this image's metadata (the image itself for a snapshot view).
    image: PathBuf,
    /// Writes hold it shared; snapshot creation holds it exclusively.
    io_gate: RwLock<()>,
    stores: Arc<Stores>,
}

fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { op, offset, source }
}

impl FileStore {
    /// Opens `path`, creating it sparse at `options.create_size` if missing.
    pub fn open(path: &Path, options: &OpenOptions, stores: &Arc<Stores>) -> Result<Self, StoreError> {
        if !path.exists() {
            let size = options.create_size.ok_or_else(|| StoreError::Missing(path.to_owned()))?;
            let me = Self::create(path, size, stores)?;
            return if options.read_only { Self::open(path, options, stores) } else { Ok(me) };
        }
        let me = Self::open_file(path, path, None, options.read_only, stores)?;
        // Larger is an image grown online (`disk resize`) whose VM file still has the old size.
        if let Some(expected) = options.create_size.filter(|&s| s > me.size()) {
            return Err(StoreError::SizeMismatch { path: path.to_owned(), expected, actual: me.size() });
        }
        Ok(me)
    }

    /// Opens a data file whose sidecar (metadata, parent) belongs to `image`.
    fn open_file(
        data: &Path,
        image: &Path,
        snapshot_of: Option<(PathBuf, String)>,
        read_only: bool,
        stores: &Arc<Stores>,
    ) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: data.to_owned(), source };
        let file = FsOpenOptions::new().read(true).write(!read_only).open(data).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        let sidecar = Sidecar::load(image)?;
        let layer = match &sidecar.parent {
            Some(parent) => {
                Some(Arc::new(open_layer(data, parent, size, sidecar.granularity, false, read_only, stores)?))
            }
            None => None,
        };
        Ok(Self {
            file,
            path: data.to_owned(),
            size: AtomicU64::new(size),
            read_only,
            snapshot_of,
            layer: ArcSwapOption::new(layer),
            image: image.to_owned(),
            io_gate: RwLock::new(()),
            stores: stores.clone(),
        })
    }

    /// Creates a new sparse image; fails if it exists.
    pub fn create(path: &Path, size: u64, stores: &Arc<Stores>) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = match FsOpenOptions::new().read(true).write(true).create_new(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(path.display().to_string()))
            }
            Err(e) => return Err(open_err(e)),
        };
        file.set_len(size).map_err(open_err)?;
        file.sync_all().map_err(open_err)?;
        sidecar::sync_dir(path).map_err(open_err)?;
        drop(file);
        Self::open_file(path, path, None, false, stores)
    }

    /// Creates `path` as a child layered on the snapshot `parent`.
    pub fn create_child(path: &Path, parent: &ImageUri, stores: &Arc<Stores>) -> Result<Self, StoreError> {
        let parent_store = stores.open(parent, &OpenOptions { create_size: None, read_only: true })?;
        let size = parent_store.size();
        let granularity = 64 << 10;
        let me = Self::create(path, size, stores)?;
        Layer::open(path, parent.clone(), parent_store, size, granularity, true, false)?;
        me.edit_sidecar(|s| {
            s.parent = Some(parent.to_string());
            s.granularity = granularity;
        })?;
        snapshot::register_child(parent, path, true)?;
        drop(me);
        Self::open_file(path, path, None, false, stores)
    }

    /// Removes an image with its sidecar; refuses while it has snapshots.
    pub fn remove(path: &Path) -> Result<(), StoreError> {
        if !path.exists() {
            return Err(StoreError::NotFound(format!("file:{}", path.display())));
        }
        let sidecar = Sidecar::load(path)?;
        if !sidecar.snapshots.is_empty() {
            let names: Vec<&str> = sidecar.snapshots.iter().map(|s| s.name.as_str()).collect();
            return Err(StoreError::Busy(format!("file:{}", path.display()), format!("has snapshots {names:?}")));
        }
        if let Some(parent) = &sidecar.parent {
            let parent: ImageUri =
                parent.parse().map_err(|e: String| StoreError::Corrupt(path.display().to_string(), e))?;
            snapshot::register_child(&parent, path, false)?;
        }
        let rm = |p: PathBuf| match std::fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", 0)(e)),
            _ => Ok(()),
        };
        rm(layer::owned_path(path))?;
        rm(sidecar::path_of(path))?;
        let _ = std::fs::remove_dir(snapshot::dir_of(path));
        rm(path.to_owned())?;
        sidecar::sync_dir(path).map_err(io_err("remove", 0))
    }

    /// The sidecar as it is on disk (other handles may have changed it).
    fn sidecar(&self) -> Result<Sidecar, StoreError> {
        Sidecar::load(&self.image)
    }

    /// Read-modify-write of the sidecar, serialized across every handle in the process.
    fn edit_sidecar(&self, edit: impl FnOnce(&mut Sidecar)) -> Result<(), StoreError> {
        self.check_writable()?;
        sidecar::edit(&self.image, edit)
    }

    fn writes(&self) -> RwLockReadGuard<'_, ()> {
        self.io_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn fallocate(&self, op: &'static str, mode: libc::c_int, offset: u64, length: u64) -> Result<(), StoreError> {
        let err = io_err(op, offset);
        let off = libc::off_t::try_from(offset).map_err(|_| io_err(op, offset)(io::ErrorKind::InvalidInput.into()))?;
        let len = libc::off_t::try_from(length).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io_err(op, offset)(io::Error::last_os_error()))
        }
    }

    fn punch(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.fallocate("discard", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length)
    }

    /// Makes a range read as zeroes where it may hold data: nothing where
    /// it is a hole already (a fresh child), else punched, or written
    /// zeroes where the file system cannot punch.
    fn clear(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        if self.seek(offset, libc::SEEK_DATA)?.is_none_or(|data| data >= offset + length) {
            return Ok(());
        }
        match self.punch(offset, length) {
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, length)
            }
            other => other,
        }
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Next offset >= `from` where `whence` (SEEK_DATA / SEEK_HOLE) holds, or None past the end.
    fn seek(&self, from: u64, whence: libc::c_int) -> Result<Option<u64>, StoreError> {
        let off = libc::off_t::try_from(from).map_err(|_| io_err("seek", from)(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: lseek on a file descriptor we own. The file offset it moves is unused by pread/pwrite.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            return Ok(Some(u64::try_from(rc).unwrap_or(u64::MAX)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(io_err("seek", from)(err)),
        }
    }

    /// Allocation of the data file itself, ignoring any parent.
    fn own_extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
        let end = offset.saturating_add(length).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent { offset: pos, length: data - pos, kind: ExtentKind::Hole });
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).clamp(pos + 1, end);
            out.push(Extent { offset: pos, length: hole - pos, kind: ExtentKind::Data });
            pos = hole;
        }
        Ok(out)
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64);
            self.file
                .write_all_at(&zeroes[..usize::try_from(n).unwrap_or(0)], offset + done)
                .map_err(io_err("write", offset))?;
            done += n;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn open_layer(
    data: &Path,
    parent: &str,
    size: u64,
    granularity: u64,
    create: bool,
    read_only: bool,
    stores: &Arc<Stores>,
) -> Result<Layer, StoreError> {
    let uri: ImageUri = parent.parse().map_err(|e: String| StoreError::Corrupt(data.display().to_string(), e))?;
    if !granularity.is_power_of_two() || granularity < 512 {
        let why = format!("layer granularity {granularity} is not a power of two of at least 512");
        return Err(StoreError::Corrupt(data.display().to_string(), why));
    }
    let parent_store = stores.open(&uri, &OpenOptions { create_size: None, read_only: true })?;
    Layer::open(data, uri, parent_store, size, granularity, create, read_only)
}

impl BlockStore for FileStore {
    fn size(&self) -> u64 {
        self.size.load(SeqCst)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            discard: true,
            write_zeroes: true,
            extents: true,
            snapshots: self.snapshot_of.is_none(),
            layering: true,
            metadata: true,
            inline_io: self.layer.load().is_none(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        match self.layer.load().as_ref() {
            Some(layer) => layer.read(&self.file, buf, offset),
            None => self.file.read_exact_at(buf, offset).map_err(io_err("read", offset)),
        }
    }

    fn read_append(&self, out: &mut Vec<u8>, len: usize, offset: u64) -> Result<(), StoreError> {
        if self.layer.load().is_some() {
            let at = out.len();
            out.resize(at + len, 0);
            return self.read_at(&mut out[at..], offset);
        }
        out.reserve(len);
        let end = out.len() + len;
        while out.len() < end {
            let pos = offset + (len - (end - out.len())) as u64;
            let off =
                libc::off_t::try_from(pos).map_err(|_| io_err("read", pos)(io::ErrorKind::InvalidInput.into()))?;
            let want = end - out.len();
            let spare = &mut out.spare_capacity_mut()[..want];
            // SAFETY: pread writes at most `spare.len()` bytes into the vector's spare capacity
            // (valid, exclusively borrowed memory) and returns how many it wrote; no reference
            // to uninitialized bytes is created.
            let n = unsafe { libc::pread(self.file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), off) };
            match usize::try_from(n) {
                Ok(0) => return Err(io_err("read", pos)(io::ErrorKind::UnexpectedEof.into())),
                // SAFETY: the kernel initialized the `n` bytes after the current length.
                Ok(n) => unsafe { out.set_len(out.len() + n) },
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_err("read", pos)(e));
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let _gate = self.writes();
        match self.layer.load().as_ref() {
            Some(layer) => layer.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset).map_err(io_err("write", offset)),
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        let _gate = self.writes();
        if let Some(layer) = self.layer.load().as_ref() {
            return layer.zero(&self.file, offset, length, &|o, l| self.punch(o, l));
        }
        if may_unmap {
            return self.punch(offset, length);
        }
        match self.fallocate("write zeroes", libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, length) {
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, length)
            }
            other => other,
        }
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let _gate = self.writes();
        match self.layer.load().as_ref() {
            Some(layer) => layer.zero(&self.file, offset, length, &|o, l| self.punch(o, l)),
            None => self.punch(offset, length),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        match self.layer.load().as_ref() {
            Some(layer) => layer.flush(&self.file),
            None => self.file.sync_data().map_err(io_err("flush", 0)),
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
        match self.layer.load().as_ref() {
            Some(layer) => layer.extents(&|o, l| self.own_extents(o, l), offset, length),
            None => self.own_extents(offset, length),
        }
    }

    fn identity(&self) -> Result<Identity, StoreError> {
        let meta = self.file.metadata().map_err(io_err("stat", 0))?;
        let secs = u64::try_from(meta.mtime()).unwrap_or(0);
        let nanos = u64::try_from(meta.mtime_nsec()).unwrap_or(0);
        let mut id = format!("file:{}:{}", meta.dev(), meta.ino());
        if let Some((_, snap)) = &self.snapshot_of {
            id = format!("{id}@{snap}");
        }
        Ok(Identity { id, modified_ns: secs.saturating_mul(1_000_000_000).saturating_add(nanos) })
    }

    fn resize(&self, size: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        if self.layer.load().is_some() {
            return Err(StoreError::Unsupported("resizing a layered file: image"));
        }
        self.file.set_len(size).map_err(io_err("resize", size))?;
        self.file.sync_all().map_err(io_err("resize", size))?;
        self.size.store(size, SeqCst);
        Ok(())
    }

    fn create_snapshot(&self, name: &str) -> Result<(), StoreError> {
        self.check_writable()?;
        let _exclusive = self.io_gate.write().unwrap_or_else(|p| p.into_inner());
        self.flush()?;
        snapshot::create(self, name)
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let sidecar = self.sidecar()?;
        Ok(sidecar.snapshots.iter().map(|s| SnapshotInfo { name: s.name.clone(), id: s.id, size: s.size }).collect())
    }

    fn remove_snapshot(&self, name: &str) -> Result<(), StoreError> {
        snapshot::remove(self, name)
    }

    fn open_snapshot(&self, name: &str) -> Result<Arc<dyn BlockStore>, StoreError> {
        snapshot::open(self, name)
    }

    fn changed_extents(&self, since: Option<&str>, offset: u64, length: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        snapshot::changed_extents(self, since, offset, length)
    }

    fn parent(&self) -> Result<Option<ImageUri>, StoreError> {
        Ok(self.layer.load().as_ref().map(|l| l.parent_uri().clone()))
    }

    fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), StoreError> {
        const CHUNK: u64 = 4 << 20;
        let size = self.size();
        let mut pos = 0;
        while pos < size {
            let n = CHUNK.min(size - pos);
            self.copy_from_parent(pos, n)?;
            pos += n;
            progress(pos, size);
        }
        self.detach_parent()
    }

    /// Copies unowned granules of the range from the parent (the stream
    /// job's unit of work); returns bytes read from the parent (0 if not layered).
    fn copy_from_parent(&self, offset: u64, length: u64) -> Result<u64, StoreError> {
        self.check_writable()?;
        // A write like any other: a snapshot waits for it.
        let _gate = self.writes();
        match self.layer.load_full() {
            Some(layer) => layer.copy_up(&self.file, offset, length, &|o, l| self.clear(o, l)),
            None => Ok(0),
        }
    }

    /// Detaches the parent once every granule is owned; durable.
    fn detach_parent(&self) -> Result<(), StoreError> {
        let Some(layer) = self.layer.load_full() else { return Ok(()) };
        if !layer.fully_owned() {
            return Err(StoreError::Busy(
                self.path.display().to_string(),
                format!("{} bytes still read from the parent", layer.unowned_bytes()),
            ));
        }
        self.flush()?;
        let parent = layer.parent_uri().clone();
        self.edit_sidecar(|s| s.parent = None)?;
        self.layer.store(None);
        let _ = std::fs::remove_file(layer.path());
        snapshot::register_child(&parent, &self.path, false)
    }

    fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.sidecar()?.metadata.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.edit_sidecar(|s| {
            s.metadata.insert(key.to_owned(), value.to_owned());
        })
    }

    fn remove_meta(&self, key: &str) -> Result<(), StoreError> {
        self.edit_sidecar(|s| {
            s.metadata.remove(key);
        })
    }

    fn list_meta(&self) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        Ok(self.sidecar()?.metadata)
    }
}
