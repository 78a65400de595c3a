//! The YAML as written (`Raw*`, step 2 of the module docs) and its validation into the public
//! types (step 3): cross-value rules, defaults and path resolution.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::error::{ConfigError, Duplicated, Position};
use super::values::{check_name, Allow, DiskSize, Granularity, ImageUri, IntentRegion, Keep, Name, MAX_NAME_LEN};
use super::vms::{Registry, Seen};
use super::{
    AgentConfig, BackupConfig, BackupHooks, BitmapConfig, CephConfig, ControlConfig, ControlTlsConfig, DiskConfig,
    JobsConfig, MetricsConfig, MigrationConfig, NbdConfig, TlsConfig, VmConfig, DEFAULT_STATE_DIR,
};

/// `agent.yaml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    node: Option<Name>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    vms_dir: Option<PathBuf>,
    #[serde(default)]
    vms: Vec<RawVm>,
    #[serde(default)]
    nbd: NbdConfig,
    #[serde(default)]
    control: ControlConfig,
    metrics: Option<MetricsConfig>,
    ceph: Option<CephConfig>,
    migration: Option<MigrationConfig>,
    #[serde(default)]
    jobs: JobsConfig,
}

/// A VM file (or an entry of `vms:`) as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    name: Spanned<Name>,
    #[serde(default)]
    disks: Vec<RawDisk>,
    #[serde(default)]
    allow: Vec<Allow>,
    backup: Option<Spanned<RawVmBackup>>,
}

/// A VM's `backup:` section: commands run around every backup's point in time.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmBackup {
    freeze: Option<String>,
    thaw: Option<String>,
    hook_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: Spanned<Name>,
    image: Spanned<ImageUri>,
    size: Option<DiskSize>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    bitmaps: Vec<RawBitmap>,
    #[serde(default)]
    intent_region: IntentRegion,
    backup: Option<RawBackup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBitmap {
    name: Spanned<Name>,
    #[serde(default)]
    granularity: Granularity,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    target: Spanned<ImageUri>,
    bitmap: Option<Spanned<Name>>,
    keep: Option<Keep>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn enabled_by_default() -> bool {
    true
}

/// The file being validated: names it in errors and resolves its relative paths.
pub(super) struct Ctx<'a> {
    source: &'a Path,
    base: PathBuf,
}

impl<'a> Ctx<'a> {
    /// Context for text read from `source`; relative paths resolve against its directory
    /// (the working directory when it has none, as for `<embedded>`).
    pub(super) fn new(source: &'a Path) -> Self {
        let dir = source.parent().filter(|dir| !dir.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        Self { source, base }
    }

    fn at(&self, location: Location) -> Position {
        Position::at(self.source, Some(location))
    }

    fn path(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }

    fn invalid(&self, location: Location, key: String, message: String) -> ConfigError {
        ConfigError::Invalid { at: self.at(location), key, message }
    }
}

impl RawAgent {
    pub(super) fn validate(self, source: &Path) -> Result<AgentConfig, ConfigError> {
        let ctx = Ctx::new(source);
        let mut registry = Registry::default();
        let vms = self
            .vms
            .into_iter()
            .enumerate()
            .map(|(i, vm)| vm.validate(&ctx, &format!("vms[{i}]."), &mut registry))
            .collect::<Result<_, _>>()?;
        Ok(AgentConfig {
            node: self.node.map_or_else(default_node, |node| node.0),
            state_dir: ctx.path(&self.state_dir),
            vms_dir: self.vms_dir.map(|dir| ctx.path(&dir)),
            vms,
            nbd: self.nbd.resolved(&ctx),
            control: self.control.resolved(&ctx),
            metrics: self.metrics,
            ceph: self.ceph.map(|ceph| ceph.resolved(&ctx)),
            migration: self.migration.map(|m| MigrationConfig {
                ca_cert: m.ca_cert.map(|p| ctx.path(&p)),
                token_file: m.token_file.map(|p| ctx.path(&p)),
                client_cert: m.client_cert.map(|p| ctx.path(&p)),
                client_key: m.client_key.map(|p| ctx.path(&p)),
            }),
            jobs: self.jobs,
            source: source.to_owned(),
        })
    }
}

impl NbdConfig {
    fn resolved(mut self, ctx: &Ctx) -> Self {
        self.listen.iter_mut().for_each(|addr| addr.resolve(&ctx.base));
        self.tls = self.tls.map(|tls| tls.resolved(ctx));
        self
    }
}

impl TlsConfig {
    fn resolved(self, ctx: &Ctx) -> Self {
        Self {
            mode: self.mode,
            cert: ctx.path(&self.cert),
            key: ctx.path(&self.key),
            client_ca: self.client_ca.map(|ca| ctx.path(&ca)),
        }
    }
}

impl ControlConfig {
    fn resolved(mut self, ctx: &Ctx) -> Self {
        self.listen.iter_mut().for_each(|addr| addr.resolve(&ctx.base));
        self.tls = self.tls.map(|tls| ControlTlsConfig {
            cert: ctx.path(&tls.cert),
            key: ctx.path(&tls.key),
            client_ca: tls.client_ca.map(|ca| ctx.path(&ca)),
        });
        self.token_file = self.token_file.map(|f| ctx.path(&f));
        self
    }
}

impl CephConfig {
    fn resolved(self, ctx: &Ctx) -> Self {
        Self {
            conf: ctx.path(&self.conf),
            client: self.client,
            keyring: self.keyring.map(|keyring| ctx.path(&keyring)),
        }
    }
}

impl RawVm {
    /// Validates one VM; `prefix` is its key path (`vms[0].` inline, empty in a VM file).
    /// Records its name and writable images in `registry`, which rejects duplicates.
    pub(super) fn validate(self, ctx: &Ctx, prefix: &str, registry: &mut Registry) -> Result<VmConfig, ConfigError> {
        let name = self.name.value.0;
        let name_key = format!("{prefix}name");
        registry.vms.add(&name, ctx.at(self.name.referenced), name_key)?;
        let mut names = Seen::new(Duplicated::DiskName);
        let disks = self
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, disk)| {
                let key = format!("{prefix}disks[{i}]");
                names.add(&disk.name.value.0, ctx.at(disk.name.referenced), format!("{key}.name"))?;
                disk.validate(ctx, &key, registry)
            })
            .collect::<Result<_, _>>()?;
        let hooks = self.backup.map(|b| b.value.validate(ctx, b.referenced, &format!("{prefix}backup"))).transpose()?;
        Ok(VmConfig { name, disks, allow: self.allow, hooks: hooks.flatten(), source: ctx.source.to_owned() })
    }
}

impl RawDisk {
    fn validate(self, ctx: &Ctx, key: &str, registry: &mut Registry) -> Result<DiskConfig, ConfigError> {
        let image = self.image(ctx, key, registry)?;
        let bitmaps = validate_bitmaps(self.bitmaps, ctx, key)?;
        let backup = self.backup.map(|backup| backup.validate(ctx, key, &bitmaps, registry)).transpose()?;
        Ok(DiskConfig {
            name: self.name.value.0,
            image,
            size: self.size.map(|size| size.0),
            read_only: self.read_only,
            bitmaps,
            intent_region: self.intent_region.0,
            backup,
        })
    }

    /// The resolved image: a snapshot only if read-only; a writable one used only here.
    fn image(&self, ctx: &Ctx, key: &str, registry: &mut Registry) -> Result<ImageUri, ConfigError> {
        let (mut image, location) = (self.image.value.clone(), self.image.referenced);
        image.resolve(&ctx.base);
        let key = format!("{key}.image");
        if self.read_only {
            return Ok(image);
        }
        if let Some(snap) = image.snap() {
            let message = format!(
                "image {:?} is a snapshot, which is read-only (set read_only: true, or drop \"@{snap}\")",
                image.to_string()
            );
            return Err(ctx.invalid(location, key, message));
        }
        registry.images.add(&image.to_string(), ctx.at(location), key)?;
        Ok(image)
    }
}

fn validate_bitmaps(bitmaps: Vec<RawBitmap>, ctx: &Ctx, key: &str) -> Result<Vec<BitmapConfig>, ConfigError> {
    let mut names = Seen::new(Duplicated::BitmapName);
    bitmaps
        .into_iter()
        .enumerate()
        .map(|(i, bitmap)| {
            let at = ctx.at(bitmap.name.referenced);
            names.add(&bitmap.name.value.0, at, format!("{key}.bitmaps[{i}].name"))?;
            Ok(BitmapConfig { name: bitmap.name.value.0, granularity: bitmap.granularity.0, enabled: bitmap.enabled })
        })
        .collect()
}

impl RawVmBackup {
    fn validate(self, ctx: &Ctx, location: Location, key: &str) -> Result<Option<BackupHooks>, ConfigError> {
        let invalid = |message: &str| ctx.invalid(location, key.to_owned(), message.to_owned());
        let timeout = self.hook_timeout_secs.unwrap_or(30);
        if !(1..=3600).contains(&timeout) {
            return Err(invalid("hook_timeout_secs must be 1 to 3600"));
        }
        match (self.freeze, self.thaw) {
            (None, None) => Ok(None),
            (Some(freeze), Some(thaw)) if !freeze.trim().is_empty() && !thaw.trim().is_empty() => {
                Ok(Some(BackupHooks { freeze, thaw, timeout: std::time::Duration::from_secs(timeout) }))
            }
            (Some(_), Some(_)) => Err(invalid("freeze and thaw must not be empty")),
            // A freeze without its thaw would leave the guest frozen.
            _ => Err(invalid("freeze and thaw go together: set both or neither")),
        }
    }
}

impl RawBackup {
    fn validate(
        self,
        ctx: &Ctx,
        disk_key: &str,
        bitmaps: &[BitmapConfig],
        registry: &mut Registry,
    ) -> Result<BackupConfig, ConfigError> {
        let key = format!("{disk_key}.backup");
        let (mut target, location) = (self.target.value, self.target.referenced);
        target.resolve(&ctx.base);
        if target.snap().is_some() {
            let message =
                format!("backup target {:?} must not name a snapshot (each backup creates one)", target.to_string());
            return Err(ctx.invalid(location, format!("{key}.target"), message));
        }
        registry.images.add(&target.to_string(), ctx.at(location), format!("{key}.target"))?;
        let bitmap = self.bitmap.map(|b| check_bitmap(b, bitmaps, ctx, &key)).transpose()?;
        Ok(BackupConfig { target, bitmap, keep: self.keep.map(|keep| keep.0) })
    }
}

/// `backup.bitmap` must name one of the disk's bitmaps.
fn check_bitmap(bitmap: Spanned<Name>, bitmaps: &[BitmapConfig], ctx: &Ctx, key: &str) -> Result<String, ConfigError> {
    let name = bitmap.value.0;
    if bitmaps.iter().any(|b| b.name == name) {
        return Ok(name);
    }
    let declared: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    let message = format!(
        "no bitmap {name:?} on this disk (declared: {})",
        if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
    );
    Err(ctx.invalid(bitmap.referenced, format!("{key}.bitmap"), message))
}

/// The hostname made into a valid node name: invalid characters become `-`, leading `.`/`-`
/// are dropped, and the result is cut to 64 characters (`localhost` if nothing is left).
fn default_node() -> String {
    let host = hostname();
    let cleaned: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' })
        .skip_while(|&c| c == '.' || c == '-')
        .take(MAX_NAME_LEN)
        .collect();
    if check_name(&cleaned).is_ok() {
        cleaned
    } else {
        "localhost".to_owned()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}
