//! Suspect granules: the part of a bitmap that crash recovery added from
//! the write-intent log.
//!
//! After an unclean stop every granule of a logged region comes back dirty
//! (a superset of the acknowledged writes), so a few scattered writes can
//! bring back hundreds of MiB. Those granules the bitmap file did not hold
//! are *suspect*: maybe written, maybe not. An incremental backup reads a
//! suspect granule from its target too and copies it only if it differs
//! (reads are cheap; writes to the backup and its snapshot chain are not).
//! Everything else treats them as dirty.
//!
//! The set is a hint, never trusted to skip a granule unseen, so it needs
//! no write ordering with the bits: it is saved after the bits it refines
//! (at recovery and at a clean stop), and loaded as `file AND bits`.
//!
//! File `NAME.suspect` next to `NAME.bitmap`: magic, granule count (u64
//! LE), then the words (u64 LE). A missing or malformed file means none.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::disk::Bitmap;
use crate::bits::AtomicBits;
use crate::durable;

const MAGIC: &[u8; 8] = b"RBDSUSP1";

/// A bitmap's suspect granules: allocated only while there are any (a
/// crash recovery's leftover, rare), so an idle bitmap pays nothing.
#[derive(Debug, Default)]
pub(crate) struct SuspectBits(Mutex<Option<AtomicBits>>);

impl SuspectBits {
    fn lock(&self) -> MutexGuard<'_, Option<AtomicBits>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ORs `v` into word `w` of a set of `len` granules.
    pub fn or_word(&self, len: u64, w: u64, v: u64) {
        if v != 0 {
            self.lock().get_or_insert_with(|| AtomicBits::new(len)).or_word(w, v);
        }
    }

    /// Drops the granules of `v` from word `w`; frees the set once empty.
    pub fn and_not_word(&self, w: u64, v: u64) {
        let mut set = self.lock();
        if let Some(bits) = set.as_ref() {
            bits.and_not_word(w, v);
            if bits.count() == 0 {
                *set = None;
            }
        }
    }

    /// Drops every granule.
    pub fn clear_all(&self) {
        *self.lock() = None;
    }

    /// `f` of the set (`None`: empty).
    pub fn with<R>(&self, f: impl FnOnce(Option<&AtomicBits>) -> R) -> R {
        f(self.lock().as_ref())
    }

    /// The suspect granules among `of` (`None`: there are none).
    pub fn among(&self, of: &AtomicBits) -> Option<AtomicBits> {
        let set = self.lock();
        let bits = set.as_ref()?;
        let out = AtomicBits::new(of.len());
        for w in bits.dirty_words() {
            out.or_word(w, bits.word(w) & of.word(w));
        }
        (out.count() > 0).then_some(out)
    }
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.suspect"))
}

/// Marks the granules of `ranges` dirty in `b`, the newly dirty ones
/// suspect (in memory; [`save`] after the bits are durable).
pub(super) fn mark_recovered(b: &Bitmap, ranges: &[(u64, u64)]) {
    let logged = AtomicBits::new(b.bits.len());
    for &(offset, length) in ranges {
        let (first, last) = b.granules(offset, length);
        logged.set_range(first, last);
    }
    for w in logged.dirty_words() {
        let new = logged.word(w) & !b.bits.word(w);
        b.suspect.or_word(b.bits.len(), w, new);
        b.bits.or_word(w, logged.word(w));
    }
}

/// Saves `b`'s suspect set durably (removes the file when it is empty).
pub(super) fn save(dir: &Path, b: &Bitmap) -> std::io::Result<()> {
    let path = path(dir, b.name());
    let body = b.suspect.with(|set| {
        set.map(|bits| {
            let words = bits.snapshot();
            let mut body = Vec::with_capacity(16 + words.len() * 8);
            body.extend_from_slice(MAGIC);
            body.extend_from_slice(&bits.len().to_le_bytes());
            for w in words {
                body.extend_from_slice(&w.to_le_bytes());
            }
            body
        })
    });
    match body {
        Some(body) => durable::write_file(&path, &body),
        None => durable::remove_file(&path),
    }
}

/// Loads the saved set into `b` (only granules dirty in `b`).
pub(super) fn load(dir: &Path, b: &Bitmap) {
    let path = path(dir, b.name());
    let body = match std::fs::read(&path) {
        Ok(body) => body,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read suspect granules; treating them as dirty");
            return;
        }
    };
    let len = b.bits.len();
    let well_formed =
        body.len() as u64 == 16 + len.div_ceil(64) * 8 && &body[..8] == MAGIC && body[8..16] == len.to_le_bytes();
    if !well_formed {
        tracing::warn!(path = %path.display(), "malformed suspect granules file; treating them as dirty");
        return;
    }
    for (w, chunk) in body[16..].chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        b.suspect.or_word(len, w as u64, word & b.bits.word(w as u64));
    }
}

/// Drops the file of a removed bitmap.
pub(super) fn forget(dir: &Path, name: &str) {
    if let Err(e) = durable::remove_file(&path(dir, name)) {
        tracing::warn!(dir = %dir.display(), bitmap = name, error = %e, "cannot remove suspect granules file");
    }
}
