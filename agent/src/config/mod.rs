//! Configuration: `agent.yaml` plus one YAML file per VM in `vms_dir`.
//!
//! # Flow: parse, then validate
//!
//! 1. **Read**: at most [`MAX_FILE_BYTES`] of UTF-8 ([`ConfigError::Io`], [`ConfigError::TooLarge`]).
//! 2. **Parse** with serde-saphyr into private `Raw*` structs (`deny_unknown_fields`, snake_case
//!    keys). Scalars are parsed by the `Deserialize` impls of their types ([`parse_size`],
//!    [`check_name`], [`ImageUri`], [`ListenAddr`]), so a bad value is reported at its own line
//!    and column; `serde_path_to_error` supplies the key path ([`ConfigError::Parse`]).
//! 3. **Validate** rules that involve several values (duplicate names, snapshots only on
//!    read-only disks, `backup.bitmap` names a bitmap of the disk, a writable image used once).
//!    Values that such rules need are parsed as `serde_saphyr::Spanned<T>`, so these errors
//!    carry a real line too ([`ConfigError::Invalid`], [`ConfigError::Duplicate`]). Relative
//!    paths are resolved here, against the directory of the file they appear in.
//!
//! [`AgentConfig::load_vms`] runs steps 1–3 for every `*.yaml`/`*.yml` in `vms_dir` (sorted by
//! name; dot-files skipped; a missing directory means no VMs) and checks VM names and writable
//! images across all files and the VMs declared inline in `agent.yaml`.
//!
//! Errors read `FILE:LINE:COLUMN: KEY: MESSAGE`, e.g.
//! `vms.d/vm1.yaml:7:11: disks[0].size: bad size "20XB" (expected e.g. 20GiB)`.
//!
//! # Parse limits
//!
//! Config files are small and written by people, so the limits are tight. A file over the size
//! limit is a [`ConfigError::TooLarge`]; a breach of the serde-saphyr budget is a
//! [`ConfigError::Parse`] at the offending line:
//!
//! | limit                                   | value                | why                              |
//! |-----------------------------------------|----------------------|----------------------------------|
//! | file size                               | 1 MiB                | bounds everything below          |
//! | documents per file                      | 1                    | one config per file              |
//! | nesting depth (block and flow)          | 16                   | the schema nests 7 levels        |
//! | nodes / parser events                   | 100 000 / 250 000    | thousands of disks still fit     |
//! | scalar bytes                            | 1 MiB                | no more than the file            |
//! | anchors / aliases / merge keys          | 256 each             | anchors are rare in config       |
//! | events / bytes kept for anchor replay   | 10 000 / 1 MiB       | bounds memory held for aliases   |
//! | alias replay: events / depth / per anchor | 50 000 / 8 / 1 000 | stops "billion laughs" expansion |
//! | `!include`                              | off                  | no file access from YAML         |
//!
//! Booleans are strict (`true`/`false` only, not `yes`/`on`) and unknown tags are rejected.

mod error;
mod raw;
#[cfg(test)]
mod tests;
mod values;
mod vms;
mod yaml;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use error::{ConfigError, Duplicated, Position};
pub use values::{
    check_disk_size, check_granularity, check_intent_region, check_name, format_size, parse_size, Allow, ImageUri,
    ListenAddr, DEFAULT_GRANULARITY, DEFAULT_INTENT_REGION, GIB, KIB, MAX_GRANULARITY, MAX_HANDSHAKE_TIMEOUT_SECS,
    MAX_NAME_LEN, MAX_PAYLOAD, MAX_UNIX_PATH, MIB, MIN_GRANULARITY, MIN_PAYLOAD, SECTOR_SIZE, TIB,
};
pub use yaml::MAX_FILE_BYTES;

/// `source` of a configuration that was not read from a file.
pub const EMBEDDED_SOURCE: &str = "<embedded>";
/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rbdsync";
/// Default `control.listen`.
pub const DEFAULT_CONTROL_LISTEN: &str = "unix:/run/rbdsync/control.sock";
/// Default `nbd.listen`.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
/// Default `nbd.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Default `nbd.max_connections_per_export`.
pub const DEFAULT_MAX_CONNECTIONS_PER_EXPORT: u32 = 64;
/// Default `nbd.max_payload` (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Default `nbd.handshake_timeout_secs`.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default `ceph.conf`.
pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";
/// Default `ceph.client`.
pub const DEFAULT_CEPH_CLIENT: &str = "admin";

/// The commented example shipped at the repository root; [`AgentConfig::embedded_default`].
const EXAMPLE_YAML: &str = include_str!("../../../config.example.yaml");

/// `agent.yaml`, with defaults filled in and relative paths made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// This host's name in snapshot metadata and metrics (default: the hostname).
    pub node: String,
    /// Bitmaps, job records and local overlays (default `/var/lib/rbdsync`).
    pub state_dir: PathBuf,
    /// Directory with one YAML file per VM; a missing directory holds no VMs.
    pub vms_dir: Option<PathBuf>,
    /// VMs declared inline in `agent.yaml` (key `vms`), an extension used by the example.
    pub vms: Vec<VmConfig>,
    /// The NBD server.
    pub nbd: NbdConfig,
    /// The control API.
    pub control: ControlConfig,
    /// The Prometheus endpoint, if enabled.
    pub metrics: Option<MetricsConfig>,
    /// The Ceph cluster, if RBD images are used.
    pub ceph: Option<CephConfig>,
    /// How this agent reaches other agents' control APIs over `https://`
    /// (the destinations of its outgoing migrations).
    pub migration: Option<MigrationConfig>,
    /// Host-wide job limits (changeable on reload).
    pub jobs: JobsConfig,
    /// The file this was loaded from ([`EMBEDDED_SOURCE`] for the built-in example).
    pub source: PathBuf,
}

/// `nbd:` in `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    /// Addresses to serve NBD on (default `127.0.0.1:10809`); at least one.
    #[serde(deserialize_with = "values::listen_list")]
    pub listen: Vec<ListenAddr>,
    /// TLS for NBD clients (`NBD_OPT_STARTTLS`); absent means no TLS.
    pub tls: Option<TlsConfig>,
    /// Most simultaneous connections (default 256).
    #[serde(deserialize_with = "values::max_connections")]
    pub max_connections: u32,
    /// Largest READ/WRITE payload in bytes (default 32 MiB; 4 KiB to 256 MiB).
    #[serde(deserialize_with = "values::payload")]
    pub max_payload: u32,
    /// Seconds a client may take to finish the handshake (default 10; 1 to 3600).
    #[serde(deserialize_with = "values::handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Most simultaneous connections to one export (default 64).
    #[serde(deserialize_with = "values::max_connections")]
    pub max_connections_per_export: u32,
    /// Seconds a connection may sit idle (no request, none in flight) before
    /// it is closed (default 0: never).
    #[serde(deserialize_with = "values::idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds this agent's NBD client (mirrors, verify against `nbd://`)
    /// waits for a connect or a reply before giving the server up (default 30; 1 to 3600).
    #[serde(deserialize_with = "values::handshake_timeout")]
    pub client_timeout_secs: u64,
    /// Seconds a request on an incoming migration target (opened by its own
    /// name, as a destination QEMU does) waits for the cut-over before it
    /// fails with EIO (default 60; 1 to 3600).
    #[serde(deserialize_with = "values::handshake_timeout")]
    pub incoming_io_timeout_secs: u64,
    /// Seconds a mirror keeps trying to reconnect to a destination that
    /// dropped the connection or stopped answering, resuming from its dirty
    /// set; past that it fails (default 10; 0 = fail at once; up to 3600).
    #[serde(deserialize_with = "values::reconnect")]
    pub client_reconnect_secs: u64,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            listen: vec![default_listen(DEFAULT_NBD_LISTEN)],
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_payload: DEFAULT_MAX_PAYLOAD,
            handshake_timeout_secs: DEFAULT_HANDSHAKE_TIMEOUT_SECS,
            max_connections_per_export: DEFAULT_MAX_CONNECTIONS_PER_EXPORT,
            idle_timeout_secs: 0,
            client_timeout_secs: 30,
            incoming_io_timeout_secs: 60,
            client_reconnect_secs: 10,
        }
    }
}

/// `nbd.tls:`; the section's presence turns TLS on (with `mode: required` by default).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Whether clients may, must or cannot use TLS (default `required`).
    #[serde(default)]
    pub mode: TlsMode,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates; setting it makes client certificates mandatory.
    pub client_ca: Option<PathBuf>,
}

/// `nbd.tls.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS is not offered.
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS`.
    Optional,
    /// Clients must upgrade before any other option.
    #[default]
    Required,
}

/// `control:` in `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Addresses of the control API (default `unix:/run/rbdsync/control.sock`); at least one.
    /// A TCP address needs `tls` and `token_file` or `tls.client_ca`.
    #[serde(deserialize_with = "values::listen_list")]
    pub listen: Vec<ListenAddr>,
    /// TLS for TCP listeners (Unix sockets are plain, mode 0600).
    pub tls: Option<ControlTlsConfig>,
    /// File holding the bearer token TCP clients must send (mode 0600 or stricter).
    pub token_file: Option<PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { listen: vec![default_listen(DEFAULT_CONTROL_LISTEN)], tls: None, token_file: None }
    }
}

/// `control.tls:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlTlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates: a client with a certificate it signed
    /// needs no token (without `token_file`, a certificate is mandatory).
    pub client_ca: Option<PathBuf>,
}

/// `jobs:` in `agent.yaml`: limits shared by every job of the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Bytes/s all jobs together may copy (0 = unlimited); each job's own
    /// `speed` applies as well.
    #[serde(deserialize_with = "values::rate")]
    pub max_rate: u64,
    /// Jobs running at once (0 = unlimited); the rest wait as `queued`.
    pub max_running: u32,
}

/// `metrics:` in `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address of the `/metrics` endpoint, e.g. `127.0.0.1:9860`.
    #[serde(deserialize_with = "values::tcp_addr")]
    pub listen: SocketAddr,
}

/// `ceph:` in `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CephConfig {
    /// `ceph.conf` (default `/etc/ceph/ceph.conf`).
    #[serde(default = "default_ceph_conf")]
    pub conf: PathBuf,
    /// Client id without the `client.` prefix (default `admin`).
    #[serde(default = "default_ceph_client", deserialize_with = "values::name")]
    pub client: String,
    /// Keyring; absent means librados' default search.
    pub keyring: Option<PathBuf>,
}

/// One VM file (or one entry of `vms:` in `agent.yaml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// VM name; disks are exported as `NAME/DISK`.
    pub name: String,
    /// The VM's disks, names unique within the VM.
    pub disks: Vec<DiskConfig>,
    /// Who may list and open its exports (`unix`, `cn:NAME`, `ADDR[/PREFIX]`);
    /// empty: every client that reaches a listener.
    pub allow: Vec<Allow>,
    /// Commands around every backup's point in time (`backup:` of the VM).
    pub hooks: Option<BackupHooks>,
    /// The file the VM was declared in.
    pub source: PathBuf,
}

/// Application-consistent backups: `freeze` runs (`sh -c`) before a backup
/// of any disk of the VM fixes its point in time, `thaw` right after (also
/// when the freeze or the backup failed), each within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHooks {
    /// Command that quiesces the guest (e.g. the QEMU guest agent's `guest-fsfreeze-freeze`).
    pub freeze: String,
    /// Command that resumes it.
    pub thaw: String,
    /// Longest each may run before it is killed.
    pub timeout: std::time::Duration,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Disk name, unique within the VM.
    pub name: String,
    /// The image; a snapshot only if `read_only`.
    pub image: ImageUri,
    /// Size in bytes (a multiple of 512) to create the image with if it is missing.
    pub size: Option<u64>,
    /// Export read-only.
    pub read_only: bool,
    /// Dirty bitmaps to keep, names unique within the disk.
    pub bitmaps: Vec<BitmapConfig>,
    /// Write-intent region in bytes (default 64 MiB; 0 = exact, a sync per
    /// first write to each clean granule).
    pub intent_region: u64,
    /// Defaults for `rbdsync backup`.
    pub backup: Option<BackupConfig>,
}

/// A dirty bitmap of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapConfig {
    /// Bitmap name, unique within the disk.
    pub name: String,
    /// Bytes per bit: a power of two from 4 KiB to 64 MiB (default 64 KiB).
    pub granularity: u64,
    /// Whether writes are recorded (default true).
    pub enabled: bool,
}

impl BitmapConfig {
    /// A bitmap checked by the same rules as the config files (for the control API).
    pub fn new(name: &str, granularity: u64, enabled: bool) -> Result<Self, String> {
        check_name(name)?;
        check_granularity(granularity)?;
        Ok(Self { name: name.to_owned(), granularity, enabled })
    }
}

/// `migration:` in `agent.yaml`: credentials for destination agents' control
/// APIs on `https://` (unix: and http:// need none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// CA certificate(s) (PEM) that signed the destinations' certificates.
    pub ca_cert: Option<PathBuf>,
    /// File holding the bearer token the destinations accept.
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM), for destinations that check certificates.
    pub client_cert: Option<PathBuf>,
    /// Its key (PEM).
    pub client_key: Option<PathBuf>,
}

/// `backup:` of a disk: defaults for `rbdsync backup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// Where backups go; never a snapshot (each backup creates one).
    pub target: ImageUri,
    /// Bitmap for incremental backups; one of the disk's `bitmaps`.
    pub bitmap: Option<String>,
    /// How many backup snapshots to keep (at least 1); absent keeps all.
    pub keep: Option<u32>,
}

impl AgentConfig {
    /// Reads `agent.yaml` from `path`; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::from_str(&yaml::read(path)?, path)
    }

    /// Parses `agent.yaml` text that was read from `source`; relative paths are resolved
    /// against `source`'s directory (the working directory for [`EMBEDDED_SOURCE`]).
    pub fn from_str(yaml: &str, source: &Path) -> Result<AgentConfig, ConfigError> {
        yaml::parse::<raw::RawAgent>(yaml, source)?.validate(source)
    }

    /// The shipped `config.example.yaml`. Cannot fail: a unit test parses it.
    pub fn embedded_default() -> AgentConfig {
        Self::from_str(EXAMPLE_YAML, Path::new(EMBEDDED_SOURCE))
            .unwrap_or_else(|err| unreachable!("config.example.yaml is invalid: {err}"))
    }
}

impl VmConfig {
    /// Reads one VM file; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        Self::from_str(&yaml::read(path)?, path)
    }

    /// Parses VM file text that was read from `source`.
    pub fn from_str(yaml: &str, source: &Path) -> Result<VmConfig, ConfigError> {
        let raw = yaml::parse::<raw::RawVm>(yaml, source)?;
        raw.validate(&raw::Ctx::new(source), "", &mut vms::Registry::default())
    }
}

fn default_listen(addr: &str) -> ListenAddr {
    addr.parse().unwrap_or_else(|err| unreachable!("default listen address: {err}"))
}

fn default_ceph_conf() -> PathBuf {
    PathBuf::from(DEFAULT_CEPH_CONF)
}

fn default_ceph_client() -> String {
    DEFAULT_CEPH_CLIENT.to_owned()
}
