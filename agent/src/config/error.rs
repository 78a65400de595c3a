//! [`ConfigError`]: every way loading the configuration can fail, located in the file.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

/// A place in a config file. `line` and `column` are 1-based; 0 means unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file, as it was named when loaded (`<embedded>` for the built-in example).
    pub file: PathBuf,
    /// 1-based line, or 0 when unknown.
    pub line: u64,
    /// 1-based column, or 0 when unknown.
    pub column: u64,
}

impl Position {
    /// The whole file, without a line.
    pub fn file(file: &Path) -> Self {
        Self { file: file.to_owned(), line: 0, column: 0 }
    }

    /// A serde-saphyr location in `file` (its `UNKNOWN` location has line 0).
    pub(super) fn at(file: &Path, location: Option<Location>) -> Self {
        let (line, column) = location.map_or((0, 0), |l| (l.line(), l.column()));
        Self { file: file.to_owned(), line, column }
    }
}

/// `file:line:column`, `file:line` or `file`, like compiler diagnostics.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        Ok(())
    }
}

/// What a [`ConfigError::Duplicate`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicated {
    /// Two VMs share a name (across `agent.yaml` and all VM files).
    VmName,
    /// Two disks of a VM share a name.
    DiskName,
    /// Two bitmaps of a disk share a name.
    BitmapName,
    /// An image is written by two disks or backups.
    Image,
}

impl fmt::Display for Duplicated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::VmName => "VM name",
            Self::DiskName => "disk name",
            Self::BitmapName => "bitmap name",
            Self::Image => "image",
        })
    }
}

/// `"key: "`, or nothing for the document root.
fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

/// Why a configuration could not be loaded.
///
/// `Display` reads `FILE:LINE:COLUMN: KEY: MESSAGE`, e.g.
/// `vms.d/vm1.yaml:7:11: disks[0].size: bad size "20XB" (expected e.g. 20GiB)`, where `KEY`
/// is the path to the offending value (`disks[0].size`) and is left out at the root.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading a config file or listing the VM directory failed.
    #[error("{}: cannot read", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A config file is larger than the size limit.
    #[error("{}: file is larger than {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: usize,
    },
    /// The YAML does not fit the schema: a syntax error, an unknown key, a missing key, a value
    /// of the wrong type or a malformed value (size, name, URI, address).
    #[error("{at}: {}{message}", key_prefix(key))]
    Parse {
        /// Where the parser stopped.
        at: Position,
        /// Path to the offending key, e.g. `disks[0].size`; empty at the root.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Every value parsed but together they break a rule, e.g. a snapshot as a writable image.
    #[error("{at}: {}{message}", key_prefix(key))]
    Invalid {
        /// The offending value.
        at: Position,
        /// Path to the offending key, e.g. `disks[0].image`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A VM, disk or bitmap name, or a writable image, is declared twice.
    #[error("{at}: {}duplicate {what} {value:?} (first defined at {first})", key_prefix(key))]
    Duplicate {
        /// What is duplicated.
        what: Duplicated,
        /// The duplicated value.
        value: String,
        /// The second declaration.
        at: Position,
        /// Path to the second declaration's key.
        key: String,
        /// The first declaration (line 0 when it was declared inline in `agent.yaml`).
        first: Box<Position>,
    },
}

impl ConfigError {
    /// Where in which file the error is, if it is about one place.
    pub fn position(&self) -> Option<&Position> {
        match self {
            Self::Parse { at, .. } | Self::Invalid { at, .. } | Self::Duplicate { at, .. } => Some(at),
            Self::Io { .. } | Self::TooLarge { .. } => None,
        }
    }

    /// The path to the offending key (`disks[0].size`), if the error is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Parse { key, .. } | Self::Invalid { key, .. } | Self::Duplicate { key, .. } => Some(key),
            Self::Io { .. } | Self::TooLarge { .. } => None,
        }
    }
}
