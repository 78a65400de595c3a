//! The sidecar of a `file:` image: `IMAGE.rbdsync`, a JSON document with
//! the parent, snapshots, children and key/value metadata. Rewritten
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old or the new version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// Format version written and accepted.
const VERSION: u32 = 1;

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapRecord {
    /// Name.
    pub name: String,
    /// Increasing id.
    pub id: u64,
    /// Image size at the time.
    pub size: u64,
}

/// The sidecar document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// Format version.
    pub version: u32,
    /// Parent snapshot URI (`file:/x@s` or `rbd:pool/img@s`) while layered.
    pub parent: Option<String>,
    /// Copy-up granularity of a layered image.
    pub granularity: u64,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapRecord>,
    /// Next snapshot id.
    pub next_id: u64,
    /// Children layered on this image's snapshots, as `CHILD_URI SNAP`.
    pub children: Vec<String>,
    /// Key/value metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Default for Sidecar {
    fn default() -> Self {
        Self {
            version: VERSION,
            parent: None,
            granularity: 64 << 10,
            snapshots: Vec::new(),
            next_id: 1,
            children: Vec::new(),
            metadata: BTreeMap::new(),
        }
    }
}

/// Path of the sidecar of `image`.
pub fn path_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".rbdsync");
    PathBuf::from(p)
}

impl Sidecar {
    /// Loads the sidecar of `image` (default if there is none).
    pub fn load(image: &Path) -> Result<Self, StoreError> {
        let path = path_of(image);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(StoreError::Open { path, source }),
        };
        let me: Self =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(path.display().to_string(), e.to_string()))?;
        if me.version != VERSION {
            return Err(StoreError::Corrupt(path.display().to_string(), format!("version {}", me.version)));
        }
        Ok(me)
    }

    /// Writes the sidecar of `image` atomically and durably.
    pub fn save(&self, image: &Path) -> Result<(), StoreError> {
        let path = path_of(image);
        let io = |source| StoreError::Io { op: "write metadata", offset: 0, source };
        let body = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        crate::durable::write_file(&path, &body).map_err(io)
    }
}

/// Serializes sidecar edits across all handles of this process.
static EDIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads, edits and atomically saves the sidecar of `image`.
pub fn edit(image: &Path, edit: impl FnOnce(&mut Sidecar)) -> Result<(), StoreError> {
    let _lock = EDIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = Sidecar::load(image)?;
    edit(&mut s);
    s.save(image)
}

/// fsyncs the directory holding `path` (makes a rename or unlink durable).
pub use crate::durable::sync_dir;
