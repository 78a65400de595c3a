//! Files that must survive a crash or power loss whole: written to a
//! temporary name, synced, renamed over the target, and the directory
//! synced, so after any crash the path holds either the old or the new
//! content, and a completed write stays.

use std::io::Write;
use std::path::Path;

/// Writes `body` to `path` atomically and durably (creating its directory).
pub fn write_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Removes `path` durably (a missing file is fine).
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Syncs the directory holding `path` (makes a rename or unlink in it durable).
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?.sync_all()
}
