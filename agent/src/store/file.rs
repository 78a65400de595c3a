//! The local store: raw sparse files.
//!
//! Reads and writes are `pread`/`pwrite`; discard and write-zeroes use
//! `fallocate` (punch hole / zero range); allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE`; flush is `fdatasync`.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{BlockStore, Capabilities, Extent, ExtentKind, Identity, OpenOptions, StoreError};

/// A raw image file.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileStore {
    /// Opens `path`, creating it sparse at `options.create_size` if missing.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_owned(), source };
        let file = match FsOpenOptions::new().read(true).write(!options.read_only).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(path, options)?,
            Err(e) => return Err(open_err(e)),
        };
        let size = file.metadata().map_err(open_err)?.len();
        if let Some(expected) = options.create_size.filter(|&s| s != size) {
            return Err(StoreError::SizeMismatch { path: path.to_owned(), expected, actual: size });
        }
        Ok(Self { file, path: path.to_owned(), size, read_only: options.read_only })
    }

    /// Path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(&self, op: &'static str, mode: libc::c_int, offset: u64, length: u64) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io { op, offset, source };
        let off = libc::off_t::try_from(offset).map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
        let len = libc::off_t::try_from(length).map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io_err(io::Error::last_os_error()))
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
        let io_err = |source| StoreError::Io { op: "seek", offset: from, source };
        let off = libc::off_t::try_from(from).map_err(|_| io_err(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: lseek on a file descriptor we own. The file offset it moves is unused by pread/pwrite.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if rc >= 0 {
            return Ok(Some(u64::try_from(rc).unwrap_or(u64::MAX)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(io_err(err)),
        }
    }
}

fn create(path: &Path, options: &OpenOptions) -> Result<File, StoreError> {
    let open_err = |source| StoreError::Open { path: path.to_owned(), source };
    let size = options.create_size.ok_or_else(|| StoreError::Missing(path.to_owned()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(open_err)?;
    }
    let file = FsOpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(open_err)?;
    file.set_len(size).map_err(open_err)?;
    file.sync_all().map_err(open_err)?;
    if options.read_only {
        return FsOpenOptions::new().read(true).open(path).map_err(open_err);
    }
    Ok(file)
}

impl BlockStore for FileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: self.read_only, discard: true, write_zeroes: true, extents: true }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(source) => Err(StoreError::Io { op: "read", offset, source }),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset).map_err(|source| StoreError::Io { op: "write", offset, source })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> Result<(), StoreError> {
        self.check_writable()?;
        if may_unmap {
            return self.discard(offset, length);
        }
        match self.fallocate("write zeroes", libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, length) {
            Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                write_zero_buffers(self, offset, length)
            }
            other => other,
        }
    }

    fn discard(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        self.fallocate("discard", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| StoreError::Io { op: "flush", offset: 0, source })
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, StoreError> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent { offset: pos, length: data - pos, kind: ExtentKind::Hole });
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            let hole = hole.max(pos + 1).min(end);
            out.push(Extent { offset: pos, length: hole - pos, kind: ExtentKind::Data });
            pos = hole;
        }
        Ok(out)
    }

    fn identity(&self) -> Result<Identity, StoreError> {
        let meta = self.file.metadata().map_err(|source| StoreError::Io { op: "stat", offset: 0, source })?;
        let secs = u64::try_from(meta.mtime()).unwrap_or(0);
        let nanos = u64::try_from(meta.mtime_nsec()).unwrap_or(0);
        let id = format!("file:{}:{}", meta.dev(), meta.ino());
        Ok(Identity { id, modified_ns: secs.saturating_mul(1_000_000_000).saturating_add(nanos) })
    }
}

fn write_zero_buffers(store: &FileStore, offset: u64, length: u64) -> Result<(), StoreError> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(CHUNK);
        store.write_at(&zeroes[..usize::try_from(n).unwrap_or(zeroes.len())], offset + done)?;
        done += n;
    }
    Ok(())
}
