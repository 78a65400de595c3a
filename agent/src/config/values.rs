//! Scalar values that appear in config files: sizes, names, image URIs, listen addresses.
//!
//! Every value has one string parser (`parse_size`, `check_name`, `FromStr`) shared by the
//! config files, the CLI and the control API. The serde glue at the bottom calls the same
//! parsers *inside* `Deserialize`, so serde-saphyr attaches the YAML line and column to any
//! error they return.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One tebibyte.
pub const TIB: u64 = 1 << 40;

/// Longest VM, disk or bitmap name.
pub const MAX_NAME_LEN: usize = 64;
/// Smallest dirty-bitmap granularity.
pub const MIN_GRANULARITY: u64 = 4 * KIB;
/// Largest dirty-bitmap granularity.
pub const MAX_GRANULARITY: u64 = 64 * MIB;
/// `intent_region` of a disk that does not name one: the write-intent region
/// whose first write pays for a bitmap sync (see `bitmap` module docs).
pub const DEFAULT_INTENT_REGION: u64 = 64 * MIB;
/// Granularity of a bitmap that does not name one.
pub const DEFAULT_GRANULARITY: u64 = 64 * KIB;
/// Disk sizes are whole sectors of this many bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Smallest `nbd.max_payload`.
pub const MIN_PAYLOAD: u32 = 4 * 1024;
/// Largest `nbd.max_payload`.
pub const MAX_PAYLOAD: u32 = 256 * 1024 * 1024;
/// Longest `nbd.handshake_timeout_secs`.
pub const MAX_HANDSHAKE_TIMEOUT_SECS: u64 = 3600;
/// Longest `unix:` socket path in bytes (`sun_path` holds 108 bytes with the NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// Units accepted by [`parse_size`], all binary; matched case-insensitively.
const UNITS: [(&str, &str, u32); 6] =
    [("b", "", 0), ("k", "kib", 10), ("m", "mib", 20), ("g", "gib", 30), ("t", "tib", 40), ("p", "pib", 50)];

/// Parses a byte count: a whole number with an optional binary unit.
///
/// Accepted: `4096`, `4096B`, `64K`/`64KiB`, `512M`/`512MiB`, `20G`/`20GiB`, `1T`/`1TiB`,
/// `1P`/`1PiB` (units are case-insensitive and always powers of 1024; a space may separate
/// number and unit). Rejected: empty input, signs, fractions (`1.5GiB`: write `1536MiB`),
/// decimal units such as `GB`, and values that overflow `u64`. The error is the message
/// shown to the operator.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(bad_size(s));
    }
    if unit.starts_with('.') {
        return Err(format!("bad size {s:?} (fractions are not supported; use a smaller unit, e.g. 1536MiB)"));
    }
    let shift = unit_shift(unit.trim_start()).ok_or_else(|| bad_size(s))?;
    number.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift)).ok_or_else(|| format!("size {s:?} is too large"))
}

fn unit_shift(unit: &str) -> Option<u32> {
    let unit = unit.to_ascii_lowercase();
    UNITS.iter().find(|(short, long, _)| unit == *short || unit == *long).map(|&(_, _, shift)| shift)
}

fn bad_size(s: &str) -> String {
    format!("bad size {s:?} (expected e.g. 20GiB)")
}

/// Formats a byte count with the largest binary unit that divides it exactly (`3072` -> `3KiB`).
pub fn format_size(bytes: u64) -> String {
    const NAMES: [(&str, u32); 5] = [("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    NAMES
        .iter()
        .find(|&&(_, shift)| bytes != 0 && bytes.trailing_zeros() >= shift)
        .map_or_else(|| bytes.to_string(), |&(name, shift)| format!("{}{name}", bytes >> shift))
}

/// Checks a VM, disk, bitmap or Ceph client name: 1–64 characters of `[A-Za-z0-9_.-]`, not
/// starting with `.` or `-`. Names become NBD export names (`VM/DISK`) and file names.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "bad name {name:?} (expected 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -, \
             not starting with . or -)"
        ))
    }
}

/// Checks a disk's `intent_region`: 0, or a power of two from 64 KiB to 64 MiB.
pub fn check_intent_region(bytes: u64) -> Result<(), String> {
    if bytes == 0 || (bytes.is_power_of_two() && (64 * KIB..=MAX_GRANULARITY).contains(&bytes)) {
        Ok(())
    } else {
        Err(format!("bad intent_region {} (expected 0 or a power of two from 64KiB to 64MiB)", format_size(bytes)))
    }
}

/// Checks a dirty-bitmap granularity: a power of two from 4 KiB to 64 MiB.
pub fn check_granularity(bytes: u64) -> Result<(), String> {
    if bytes.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&bytes) {
        Ok(())
    } else {
        Err(format!("bad granularity {} (expected a power of two from 4KiB to 64MiB)", format_size(bytes)))
    }
}

/// Checks a disk size: more than zero and a multiple of 512 bytes.
pub fn check_disk_size(bytes: u64) -> Result<(), String> {
    if bytes == 0 {
        Err("size must be greater than 0".to_owned())
    } else if !bytes.is_multiple_of(SECTOR_SIZE) {
        Err(format!("size {bytes} is not a multiple of {SECTOR_SIZE} bytes"))
    } else {
        Ok(())
    }
}

/// Where an image lives: a raw file or a Ceph RBD image (or one of its snapshots).
///
/// Written `file:/abs/path`, `rbd:POOL/IMAGE` or `rbd:POOL/IMAGE@SNAP`; `Display` gives
/// the same form back. `file:///abs` is accepted as `file:/abs`. A relative `file:` path in
/// a config file is resolved against that file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageUri {
    /// A raw sparse file, or a snapshot of one when `snap` is set
    /// (`file:/path@snap`; a file name must not contain `@`).
    File {
        /// Path of the image file.
        path: PathBuf,
        /// Snapshot name, if this names a snapshot.
        snap: Option<String>,
    },
    /// A Ceph RBD image, or a snapshot of one when `snap` is set.
    Rbd {
        /// Pool name.
        pool: String,
        /// Image name (no RBD namespaces).
        image: String,
        /// Snapshot name, if this names a snapshot.
        snap: Option<String>,
    },
}

impl ImageUri {
    /// The snapshot this URI names, if any.
    pub fn snap(&self) -> Option<&str> {
        match self {
            Self::Rbd { snap, .. } | Self::File { snap, .. } => snap.as_deref(),
        }
    }

    /// Makes a relative `file:` path absolute by joining it to `base`.
    pub(super) fn resolve(&mut self, base: &Path) {
        if let Self::File { path, .. } = self {
            *path = base.join(&*path);
        }
    }

    /// A `file:` URI without a snapshot.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File { path: path.into(), snap: None }
    }

    /// The same image with snapshot `snap` (or without one for `None`).
    pub fn with_snap(&self, snap: Option<&str>) -> Self {
        let snap = snap.map(str::to_owned);
        match self {
            Self::File { path, .. } => Self::File { path: path.clone(), snap },
            Self::Rbd { pool, image, .. } => Self::Rbd { pool: pool.clone(), image: image.clone(), snap },
        }
    }
}

impl FromStr for ImageUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("file:") {
            parse_file_uri(path).map_err(|why| bad_uri(s, why))
        } else if let Some(spec) = s.strip_prefix("rbd:") {
            parse_rbd_uri(spec).map_err(|why| bad_uri(s, why))
        } else {
            Err(bad_uri(s, "expected file:/path, rbd:pool/image or rbd:pool/image@snap"))
        }
    }
}

fn bad_uri(s: &str, why: &str) -> String {
    format!("bad image URI {s:?} ({why})")
}

fn parse_file_uri(path: &str) -> Result<ImageUri, &'static str> {
    let path = match path.strip_prefix("//") {
        Some(rest) if rest.starts_with('/') => rest,
        Some(_) => return Err("file: takes a local path such as file:/var/lib/x.raw, not a host"),
        None => path,
    };
    if path.is_empty() || path.contains('\0') {
        return Err("file: needs a path, e.g. file:/var/lib/rbdsync/images/x.raw");
    }
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    let (path, snap) = match path[name_start..].split_once('@') {
        Some((name, snap)) => (&path[..name_start + name.len()], Some(snap)),
        None => (path, None),
    };
    if let Some(snap) = snap {
        check_rbd_part(snap)?;
        if path.ends_with('/') {
            return Err("file: needs a file name before @snapshot");
        }
    }
    Ok(ImageUri::File { path: PathBuf::from(path), snap: snap.map(str::to_owned) })
}

fn parse_rbd_uri(spec: &str) -> Result<ImageUri, &'static str> {
    let (spec, snap) = match spec.split_once('@') {
        Some((spec, snap)) => (spec, Some(snap)),
        None => (spec, None),
    };
    let (pool, image) = spec.split_once('/').ok_or("expected rbd:pool/image")?;
    if image.contains('/') {
        return Err("extra \"/\": expected rbd:pool/image; RBD namespaces are not supported");
    }
    for part in [Some(pool), Some(image), snap].into_iter().flatten() {
        check_rbd_part(part)?;
    }
    Ok(ImageUri::Rbd { pool: pool.to_owned(), image: image.to_owned(), snap: snap.map(str::to_owned) })
}

fn check_rbd_part(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        Err("pool, image and snapshot names must not be empty")
    } else if part.contains(|c: char| c == '@' || c.is_whitespace() || c.is_control()) {
        Err("names must not contain \"@\", spaces or control characters")
    } else {
        Ok(())
    }
}

impl fmt::Display for ImageUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, snap } => {
                write!(f, "file:{}", path.display())?;
                snap.as_ref().map_or(Ok(()), |snap| write!(f, "@{snap}"))
            }
            Self::Rbd { pool, image, snap } => {
                write!(f, "rbd:{pool}/{image}")?;
                snap.as_ref().map_or(Ok(()), |snap| write!(f, "@{snap}"))
            }
        }
    }
}

/// An address to listen on: `IP:PORT` (`0.0.0.0:10809`, `[::1]:10809`) or `unix:/path`.
/// `Display` gives the same form back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP socket address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Makes a relative `unix:` path absolute by joining it to `base`.
    pub(super) fn resolve(&mut self, base: &Path) {
        if let Self::Unix(path) = self {
            *path = base.join(&*path);
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(path) if path.is_empty() || path.contains('\0') => {
                Err(format!("bad listen address {s:?} (unix: needs a socket path)"))
            }
            Some(path) if path.len() > MAX_UNIX_PATH => {
                Err(format!("bad listen address {s:?} (socket paths are limited to {MAX_UNIX_PATH} bytes)"))
            }
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => s.parse().map(Self::Tcp).map_err(|_| {
                format!(
                    "bad listen address {s:?} (expected IP:PORT such as 127.0.0.1:10809 or \
                     [::1]:10809, or unix:/path)"
                )
            }),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

// ---- serde glue: the parsers above, run inside `Deserialize` so errors carry a location ----

/// Deserializes a value through its `FromStr` impl.
fn from_str_de<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    String::deserialize(d)?.parse().map_err(de::Error::custom)
}

impl<'de> Deserialize<'de> for ImageUri {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_de(d)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_de(d)
    }
}

impl Serialize for ImageUri {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Accepts a size as a YAML integer (`4096`) or a string with a unit (`64KiB`).
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as 20GiB")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(bad_size(&v.to_string())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        Err(E::custom(format!("bad size {v} (fractions are not supported; use a smaller unit, e.g. 1536MiB)")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_size(v).map_err(E::custom)
    }
}

/// Deserializes a size and runs `check` on it.
fn checked_size<'de, D>(d: D, check: fn(u64) -> Result<(), String>) -> Result<u64, D::Error>
where
    D: Deserializer<'de>,
{
    let bytes = d.deserialize_any(SizeVisitor)?;
    check(bytes).map_err(de::Error::custom)?;
    Ok(bytes)
}

/// A name that passed [`check_name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        check_name(&name).map_err(de::Error::custom)?;
        Ok(Self(name))
    }
}

/// A disk size that passed [`check_disk_size`].
pub(super) struct DiskSize(pub u64);

impl<'de> Deserialize<'de> for DiskSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_size(d, check_disk_size).map(Self)
    }
}

/// A bitmap granularity that passed [`check_granularity`].
pub(super) struct Granularity(pub u64);

impl Default for Granularity {
    fn default() -> Self {
        Self(DEFAULT_GRANULARITY)
    }
}

impl<'de> Deserialize<'de> for Granularity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_size(d, check_granularity).map(Self)
    }
}

/// A disk's `intent_region`: 0 (exact write-intent) or a power of two from 64 KiB to 64 MiB.
pub(super) struct IntentRegion(pub u64);

impl Default for IntentRegion {
    fn default() -> Self {
        Self(DEFAULT_INTENT_REGION)
    }
}

impl<'de> Deserialize<'de> for IntentRegion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_size(d, check_intent_region).map(Self)
    }
}

/// One entry of a VM's `allow` list: who may see and use its exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// `unix`: clients on the agent's Unix sockets.
    Unix,
    /// `cn:NAME`: a TLS client whose verified certificate has subject CN `NAME`.
    Cn(String),
    /// `ADDR` or `ADDR/PREFIX`: TCP clients from that address or network.
    Net {
        /// Network address (host bits are ignored).
        addr: std::net::IpAddr,
        /// Prefix length.
        prefix: u8,
    },
}

impl Allow {
    /// Whether a client matches: `ip` is None on a Unix socket; `cn` is the
    /// subject CN of a verified client certificate.
    pub fn matches(&self, ip: Option<std::net::IpAddr>, cn: Option<&str>) -> bool {
        use std::net::IpAddr;
        match (self, ip) {
            (Self::Unix, None) => true,
            (Self::Cn(name), _) => cn == Some(name.as_str()),
            (Self::Net { addr, prefix }, Some(ip)) => {
                let ip = match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                };
                match (addr, ip) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                        u32::from(*a) & mask == u32::from(b) & mask
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                        let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                        u128::from(*a) & mask == u128::from(b) & mask
                    }
                    _ => false,
                }
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Allow {
    /// The form [`FromStr`](std::str::FromStr) reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix => f.write_str("unix"),
            Self::Cn(name) => write!(f, "cn:{name}"),
            Self::Net { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

impl std::str::FromStr for Allow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad allow entry {s:?} (expected unix, cn:NAME, an IP address or ADDR/PREFIX)");
        if s == "unix" {
            return Ok(Self::Unix);
        }
        if let Some(name) = s.strip_prefix("cn:") {
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(bad());
            }
            return Ok(Self::Cn(name.to_owned()));
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self::Net { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Allow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A `backup.keep` count: at least 1.
pub(super) struct Keep(pub u32);

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            0 => Err(de::Error::custom("keep must be at least 1 (omit it to keep every backup)")),
            n => Ok(Self(n)),
        }
    }
}

/// `deserialize_with` for a name field.
pub(super) fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Name::deserialize(d).map(|name| name.0)
}

/// `deserialize_with` for `nbd.max_payload`: a size from 4 KiB to 256 MiB.
pub(super) fn payload<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let check = |bytes: u64| match u32::try_from(bytes) {
        Ok(b) if (MIN_PAYLOAD..=MAX_PAYLOAD).contains(&b) => Ok(()),
        _ => Err(format!("bad max_payload {} (expected 4KiB to 256MiB)", format_size(bytes))),
    };
    let bytes = checked_size(d, check)?;
    u32::try_from(bytes).map_err(de::Error::custom)
}

/// `deserialize_with` for `nbd.max_connections`: at least 1.
pub(super) fn max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(de::Error::custom("max_connections must be at least 1")),
        n => Ok(n),
    }
}

/// `deserialize_with` for `nbd.idle_timeout_secs`: 0 (off) to 7 days.
pub(super) fn idle_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let secs = u64::deserialize(d)?;
    if secs <= 7 * 86400 {
        Ok(secs)
    } else {
        Err(de::Error::custom(format!("bad idle_timeout_secs {secs} (expected 0 = off to 604800)")))
    }
}

/// `deserialize_with` for `nbd.handshake_timeout_secs`: 1 to 3600.
pub(super) fn handshake_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let secs = u64::deserialize(d)?;
    if (1..=MAX_HANDSHAKE_TIMEOUT_SECS).contains(&secs) {
        Ok(secs)
    } else {
        Err(de::Error::custom(format!("bad timeout {secs} (expected 1 to {MAX_HANDSHAKE_TIMEOUT_SECS} seconds)")))
    }
}

/// `deserialize_with` for `nbd.client_reconnect_secs`: 0 (off) to 3600.
pub(super) fn reconnect<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let secs = u64::deserialize(d)?;
    if secs <= MAX_HANDSHAKE_TIMEOUT_SECS {
        Ok(secs)
    } else {
        Err(de::Error::custom(format!("bad client_reconnect_secs {secs} (expected 0 = off to 3600)")))
    }
}

/// `deserialize_with` for a `listen` list: at least one address.
pub(super) fn listen_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ListenAddr>, D::Error> {
    let list = Vec::<ListenAddr>::deserialize(d)?;
    if list.is_empty() {
        return Err(de::Error::custom("listen needs at least one address"));
    }
    Ok(list)
}

/// `deserialize_with` for a rate in bytes/s (a size; 0 = unlimited).
pub(super) fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    checked_size(d, |_| Ok(()))
}

/// `deserialize_with` for a TCP-only address such as `metrics.listen`.
pub(super) fn tcp_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| de::Error::custom(format!("bad listen address {s:?} (expected IP:PORT such as 127.0.0.1:9860)")))
}
