//! On-disk bitmap files: `STATE_DIR/bitmaps/<VM>/<DISK>/<NAME>.bitmap`.
//!
//! ```text
//!   0      4096 B   header slot A ┐ two slots, written alternately; the valid
//!   4096   4096 B   header slot B ┘ one (CRC ok) with the higher seq wins
//!   8192   ...      body: one little-endian u64 per 64 granules
//! ```
//! The header is never rewritten in place, so a torn header write leaves the
//! other slot intact. Body words are rewritten in place in whole 4 KiB
//! pages; every 8-byte word lies inside one 512-byte sector, so a torn page
//! leaves each word either old or new. Bits are set on disk before the write
//! they cover is acknowledged and cleared only lazily, so every state the
//! body can be in after a crash is a superset of the acknowledged writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of one header slot and of a body page.
pub const PAGE: u64 = 4096;
/// Words per body page.
pub const WORDS_PER_PAGE: u64 = PAGE / 8;
const PAGE_BYTES: usize = 4096;
const BODY: u64 = 2 * PAGE;
const MAGIC: &[u8; 8] = b"RBDSBMP\0";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
const CRC_AT: usize = 4092;
const MAX_FIELD: usize = 1024;

/// Everything a bitmap file says about its bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Disk size the bitmap covers.
    pub disk_size: u64,
    /// Bumped whenever bits are cleared (clear, merge target, backup commit).
    pub generation: u64,
    /// Random id given at creation; with `generation`, names a bitmap state.
    pub uuid: [u8; 16],
    /// Writes are recorded.
    pub enabled: bool,
    /// Written by a clean shutdown: the body is exact, `image_mtime_ns` valid.
    pub clean: bool,
    /// The body is known to miss writes (a writeback failed): load as inconsistent.
    pub inconsistent: bool,
    /// Image modification time at clean shutdown (ns since the epoch).
    pub image_mtime_ns: u64,
    /// Identity of the image this bitmap tracks.
    pub identity: String,
}

/// Why a bitmap file could not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading failed.
    #[error("Cannot read {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The content is not a valid bitmap file.
    #[error("{path}: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An open bitmap file.
#[derive(Debug)]
pub struct BitmapFile {
    file: File,
    path: PathBuf,
    seq: u64,
}

impl BitmapFile {
    /// Creates a new file with an all-clear body, durably (file and directory).
    pub fn create(path: &Path, header: &Header, words: u64) -> io::Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("bitmap.tmp");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
        file.set_len(BODY + words * 8)?;
        let mut me = Self { file, path: path.to_owned(), seq: 0 };
        me.write_header(header)?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()?;
        Ok(me)
    }

    /// Opens and validates a file; returns the header and body words.
    pub fn open(path: &Path) -> Result<(Self, Header, Vec<u64>), LoadError> {
        let io_err = |source| LoadError::Io { path: path.to_owned(), source };
        let corrupt = |reason: String| LoadError::Corrupt { path: path.to_owned(), reason };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < BODY {
            return Err(corrupt(format!("truncated: {len} bytes, no complete header")));
        }
        let slots = [read_slot(&file, 0), read_slot(&file, PAGE)];
        let best = slots.iter().flatten().max_by_key(|(seq, _)| *seq).cloned();
        let Some((seq, header)) = best else {
            let why = slots.into_iter().filter_map(Result::err).collect::<Vec<_>>().join("; ");
            return Err(corrupt(format!("no valid header ({why})")));
        };
        let words = header.disk_size.div_ceil(header.granularity).div_ceil(64);
        // Longer is a grow (see `grow`) whose header still has the old size: the loader reads
        // the tail's bits when the disk did grow, and refuses any there when it did not.
        if len < BODY + words * 8 || !(len - BODY).is_multiple_of(8) {
            return Err(corrupt(format!("body has {} bytes, expected {}", len - BODY, words * 8)));
        }
        let mut raw = vec![0u8; usize::try_from(len - BODY).map_err(|_| corrupt("body too large".into()))?];
        file.read_exact_at(&mut raw, BODY).map_err(io_err)?;
        // Every word, the tail too: bits a grown disk's writes set there before the header
        // recorded the new size (the loader decides whether the tail may hold any).
        let body: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        Ok((Self { file, path: path.to_owned(), seq }, header, body))
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `header` to the older slot and makes it durable.
    pub fn write_header(&mut self, header: &Header) -> io::Result<()> {
        self.seq += 1;
        let page = encode(header, self.seq)?;
        let slot = if self.seq % 2 == 1 { 0 } else { PAGE };
        self.file.write_all_at(&page, slot)?;
        self.file.sync_data()
    }

    /// Lengthens the body to `words` words of zeroes, durably; the header
    /// still describes the old size until [`write_header`](Self::write_header)
    /// says otherwise; [`open`](Self::open) returns the longer body whole.
    pub fn grow(&self, words: u64) -> io::Result<()> {
        let len = BODY + words * 8;
        if self.file.metadata()?.len() < len {
            self.file.set_len(len)?;
        }
        self.file.sync_all()
    }

    /// Writes whole body page `page` (words `page*512..`), not yet durable.
    pub fn write_page(&self, page: u64, words: &[u64]) -> io::Result<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file.write_all_at(&bytes, BODY + page * PAGE)
    }

    /// Makes every written page durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn encode(h: &Header, seq: u64) -> io::Result<Vec<u8>> {
    let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "bitmap header field too long");
    let mut p = Vec::with_capacity(PAGE_BYTES);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&VERSION.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    for v in [h.granularity, h.disk_size, h.generation, h.image_mtime_ns] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&h.uuid);
    let flags = u32::from(h.enabled) | u32::from(h.clean) << 1 | u32::from(h.inconsistent) << 2;
    p.extend_from_slice(&flags.to_le_bytes());
    for s in [&h.name, &h.identity] {
        if s.len() > MAX_FIELD {
            return Err(too_long());
        }
        p.extend_from_slice(&u16::try_from(s.len()).map_err(|_| too_long())?.to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    p.resize(PAGE_BYTES, 0);
    let crc = crc32fast::hash(&p[..CRC_AT]);
    p[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(p)
}

fn read_slot(file: &File, at: u64) -> Result<(u64, Header), String> {
    let mut p = vec![0u8; PAGE_BYTES];
    file.read_exact_at(&mut p, at).map_err(|e| e.to_string())?;
    decode(&p)
}

fn decode(p: &[u8]) -> Result<(u64, Header), String> {
    if &p[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(p[CRC_AT..CRC_AT + 4].try_into().map_err(|_| "crc")?);
    if crc32fast::hash(&p[..CRC_AT]) != crc {
        return Err("header checksum mismatch".into());
    }
    let mut r = Reader { p, at: 8 };
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!("format version {version}, this agent reads {VERSION}"));
    }
    let seq = r.u64()?;
    let (granularity, disk_size, generation, image_mtime_ns) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let uuid: [u8; 16] = r.take(16)?.try_into().map_err(|_| "uuid")?;
    let flags = r.u32()?;
    let name = r.string()?;
    let identity = r.string()?;
    if !granularity.is_power_of_two() || !(512..=1 << 26).contains(&granularity) {
        return Err(format!("invalid granularity {granularity}"));
    }
    let header = Header {
        name,
        granularity,
        disk_size,
        generation,
        uuid,
        enabled: flags & 1 != 0,
        clean: flags & 2 != 0,
        inconsistent: flags & 4 != 0,
        image_mtime_ns,
        identity,
    };
    Ok((seq, header))
}

struct Reader<'a> {
    p: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= CRC_AT).ok_or("header field out of bounds")?;
        let s = &self.p[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "u32")?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "u64")?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = usize::from(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| "len")?));
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "non-UTF-8 string".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            name: "backup".into(),
            granularity: 65536,
            disk_size: 10 << 20,
            generation: 3,
            uuid: [7; 16],
            enabled: true,
            clean: false,
            image_mtime_ns: 0,
            inconsistent: false,
            identity: "file:1:2".into(),
        }
    }

    #[test]
    fn header_and_body_round_trip_and_newer_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bitmap");
        let mut f = BitmapFile::create(&path, &header(), 3).unwrap();
        f.write_page(0, &[1, 0, 1 << 63]).unwrap();
        let newer = Header { generation: 4, clean: true, ..header() };
        f.write_header(&newer).unwrap();
        let (_, h, body) = BitmapFile::open(&path).unwrap();
        assert_eq!(h, newer);
        assert_eq!(body, vec![1, 0, 1 << 63]);
    }

    #[test]
    fn a_torn_header_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bitmap");
        let mut f = BitmapFile::create(&path, &header(), 3).unwrap();
        f.write_header(&Header { generation: 9, ..header() }).unwrap();
        // Slot B (seq 2) holds generation 9; tear it.
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0xee; 100], PAGE + 40).unwrap();
        let (_, h, _) = BitmapFile::open(&path).unwrap();
        assert_eq!(h.generation, 3);
    }

    #[test]
    fn corrupt_and_truncated_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bitmap");
        BitmapFile::create(&path, &header(), 3).unwrap();
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.set_len(BODY + 8).unwrap();
        let err = BitmapFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("body has 8 bytes, expected 24"), "{err}");
        raw.write_all_at(&[0u8; 16], 0).unwrap();
        raw.write_all_at(&[0u8; 16], PAGE).unwrap();
        let err = BitmapFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("no valid header") && err.contains("bad magic"), "{err}");
        raw.set_len(100).unwrap();
        assert!(BitmapFile::open(&path).unwrap_err().to_string().contains("truncated"));
    }
}
