//! Reading config files and running serde-saphyr with the parse limits and key-path tracking.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_saphyr::{MessageFormatter as _, Options, UserMessageFormatter};

use super::error::{ConfigError, Position};

/// Largest config file accepted, in bytes. Real files are a few KiB.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// The key serde-saphyr's `Spanned<T>` puts its value under; it is not part of the user's path.
const SPANNED_VALUE_KEY: &str = "value";

/// Parser options: strict about what an operator most likely got wrong, and a budget sized
/// for files of at most [`MAX_FILE_BYTES`] so hostile input cannot exhaust memory or CPU
/// (see the module docs of `config` for the numbers and why).
fn options() -> Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1,
            max_depth: 16,
            flow_nesting_limit: 16,
            max_nodes: 100_000,
            max_events: 250_000,
            max_total_scalar_bytes: MAX_FILE_BYTES,
            max_anchors: 256,
            max_aliases: 256,
            max_recorded_anchor_events: 10_000,
            max_recorded_anchor_bytes: MAX_FILE_BYTES,
            max_merge_keys: 256,
            max_inclusion_depth: 0,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 50_000,
            max_replay_stack_depth: 8,
            max_alias_expansions_per_anchor: 1_000,
        },
        strict_booleans: true,
        reject_unsupported_tags: true,
        with_snippet: false,
    }
}

/// Reads a config file of at most [`MAX_FILE_BYTES`] as UTF-8.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    let io = |source| ConfigError::Io { path: path.to_owned(), source };
    let limit = u64::try_from(MAX_FILE_BYTES).unwrap_or(u64::MAX);
    let mut text = String::new();
    std::fs::File::open(path).and_then(|file| file.take(limit + 1).read_to_string(&mut text)).map_err(io)?;
    check_len(&text, path)?;
    Ok(text)
}

fn check_len(yaml: &str, file: &Path) -> Result<(), ConfigError> {
    if yaml.len() > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge { path: file.to_owned(), limit: MAX_FILE_BYTES });
    }
    Ok(())
}

/// Parses `yaml` (the contents of `file`) into `T`, locating any error by line, column and key.
pub(super) fn parse<T: DeserializeOwned>(yaml: &str, file: &Path) -> Result<T, ConfigError> {
    check_len(yaml, file)?;
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(yaml, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|err| {
            path = Some(err.path().clone());
            err.into_inner()
        })
    })
    .map_err(|err| ConfigError::Parse {
        at: Position::at(file, err.location()),
        key: path.map_or_else(String::new, |path| key_path(&path, &err)),
        message: message(&err),
    })
}

/// The error's message without serde-saphyr's location suffix, control characters escaped.
fn message(err: &serde_saphyr::Error) -> String {
    let mut out = String::new();
    for c in UserMessageFormatter.format_message(err).chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Formats a serde path as `vms[0].disks[1].size`, dropping `Spanned`'s internal `value` key
/// (kept only when it is the unknown key being reported).
fn key_path(path: &serde_path_to_error::Path, err: &serde_saphyr::Error) -> String {
    let unknown_field = matches!(err.without_snippet(), serde_saphyr::Error::SerdeUnknownField { .. });
    let last = path.iter().len().saturating_sub(1);
    let mut out = String::new();
    for (i, segment) in path.iter().enumerate() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } if key == SPANNED_VALUE_KEY && !(unknown_field && i == last) => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}
