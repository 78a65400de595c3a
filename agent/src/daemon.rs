//! The agent process: builds exports from the VM files, runs the NBD
//! server, and reacts to signals (SIGTERM/SIGINT stop, SIGHUP reloads).
//!
//! Startup order: state dir → VM files → open every disk → bind listeners →
//! write `STATE_DIR/agent.json` (pid and bound addresses, for scripts and
//! tests) → serve. Shutdown: stop accepting → every connection drains its
//! in-flight requests → flush every writable disk → remove `agent.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::api::migrations::ReloadRequest;
use crate::api::{self, Control, MigrationEnv};
use crate::bitmap::{BitmapError, DiskBitmaps};
use crate::config::{AgentConfig, Allow, ConfigError, DiskConfig, VmConfig};
use crate::export::{Export, Exports, Incoming};
use crate::jobs::backup::BackupEnv;
use crate::jobs::JobManager;
use crate::metrics::{self, Metrics};
use crate::nbd::server::ServerError;
use crate::nbd::tls::Tls;
use crate::nbd::{NbdServer, ServerSettings};
use crate::store::{OpenOptions, StoreError, Stores};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A disk could not be opened.
    #[error("Cannot open disk {disk}")]
    Disk {
        /// `VM/DISK`.
        disk: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A disk's bitmaps could not be loaded.
    #[error("Cannot load the bitmaps of disk {disk}")]
    Bitmaps {
        /// `VM/DISK`.
        disk: String,
        /// Cause.
        #[source]
        source: BitmapError,
    },
    /// NBD TLS material is unusable.
    #[error(transparent)]
    Tls(crate::nbd::tls::TlsError),
    /// The control API could not start.
    #[error(transparent)]
    Control(#[from] api::http::ServeError),
    /// A blocking task panicked.
    #[error("Internal error: {0}")]
    Panic(String),
    /// The NBD server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// State directory or signal setup failed.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    fn store(disk: &str) -> impl FnOnce(StoreError) -> DaemonError + '_ {
        move |source| DaemonError::Disk { disk: disk.to_owned(), source }
    }
}

/// The disks the agent serves, with the config each was built from.
struct Disks {
    state_dir: PathBuf,
    stores: Arc<Stores>,
    incoming: Arc<Incoming>,
    jobs: Arc<JobManager>,
    exports: Arc<Exports>,
    configs: BTreeMap<String, DiskConfig>,
}

impl Disks {
    /// Makes the served set equal the disks of `vms`. Removed and changed
    /// disks are detached and closed first (their bitmaps saved), so one
    /// image never has two owners; then new and changed disks are opened.
    /// Returns the first disk that failed to open (the others still apply).
    async fn apply(&mut self, vms: &[VmConfig]) -> Result<(), DaemonError> {
        let allow: BTreeMap<String, Vec<Allow>> = vms
            .iter()
            .flat_map(|vm| vm.disks.iter().map(|d| (format!("{}/{}", vm.name, d.name), vm.allow.clone())))
            .collect();
        let wanted: BTreeMap<String, DiskConfig> =
            vms.iter().flat_map(|vm| vm.disks.iter().map(|d| (format!("{}/{}", vm.name, d.name), d.clone()))).collect();
        // A `size:` brought in step with an online resize changes nothing: the disk stays open
        // (its clients connected). A larger one does not resize: that is `rbdsync disk resize`.
        for (name, config) in &mut self.configs {
            let Some(want) = wanted.get(name) else { continue };
            let served = self.exports.get(name).map_or(0, |e| e.size());
            if want.size != config.size && (DiskConfig { size: config.size, ..want.clone() }) == *config {
                if want.size.is_some_and(|s| s > served) {
                    tracing::warn!(disk = %name, configured = ?want.size, served, "size: is larger than the disk; grow it online with `rbdsync disk resize`");
                }
                config.size = want.size;
            }
        }
        let stale: Vec<String> =
            self.configs.iter().filter(|(k, c)| wanted.get(*k) != Some(*c)).map(|(k, _)| k.clone()).collect();
        for name in stale {
            if let Some(job) = self.jobs.active_on(&name) {
                tracing::warn!(disk = %name, %job, "disk removed or changed in the VM files but job {job} runs on it; keeping it until the job ends (reload again then)");
                continue;
            }
            tracing::info!(disk = %name, "detaching export");
            self.configs.remove(&name);
            if let Some(export) = self.exports.remove(&name) {
                close_export(export).await;
            }
        }
        let mut first_error = None;
        for (name, config) in wanted {
            if self.configs.contains_key(&name) {
                continue;
            }
            match open_disk(&self.stores, &self.state_dir, &name, &config).await {
                Ok(export) => {
                    // Before the export becomes visible: no window without its allow list.
                    export.set_allow(allow.get(&name).cloned().unwrap_or_default());
                    if let Some(token) = self.incoming.token(&name) {
                        export.set_incoming(&token);
                    }
                    tracing::info!(disk = %name, image = %config.image, incoming = export.incoming().is_some(), "serving export");
                    self.exports.insert(export);
                    self.configs.insert(name, config);
                }
                // A disk whose image is absent (its host is gone, say) waits for `rbdsync restore`;
                // only an image the store says is not there (a missing pool or parent is an error).
                Err(DaemonError::Disk { source: StoreError::NotFound(_) | StoreError::Missing(_), .. })
                    if image_absent(&self.stores, &config.image).await =>
                {
                    tracing::warn!(disk = %name, image = %config.image, "image absent: disk not served (create it with `rbdsync restore`, or give the disk a size)");
                }
                Err(e) => {
                    tracing::error!(disk = %name, error = %e, cause = ?std::error::Error::source(&e), "cannot open disk");
                    first_error.get_or_insert(e);
                }
            }
        }
        for export in self.exports.list() {
            export.set_allow(allow.get(export.name()).cloned().unwrap_or_default());
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Closes every export (after the server drained its connections).
    async fn close_all(&mut self) {
        for export in self.exports.list() {
            self.exports.remove(export.name());
            close_export(export).await;
        }
        self.configs.clear();
    }
}

/// Whether `image` is certainly not there (false when that cannot be told).
async fn image_absent(stores: &Arc<Stores>, image: &crate::config::ImageUri) -> bool {
    let (stores, image) = (stores.clone(), image.clone());
    tokio::task::spawn_blocking(move || matches!(stores.exists(&image), Ok(false))).await.unwrap_or(false)
}

/// Waits for the export's connections to let go of it, then flushes the
/// store and saves the bitmaps exactly.
async fn close_export(export: Arc<Export>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Arc::strong_count(&export) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let name = export.name().to_owned();
    let closed = tokio::task::spawn_blocking(move || {
        if !export.read_only() {
            export.store().flush()?;
        }
        let identity = export.store().identity()?;
        export.bitmaps().close(&identity);
        Ok::<(), StoreError>(())
    })
    .await;
    match closed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(disk = %name, error = %e, "closing disk failed"),
        Err(e) => tracing::error!(disk = %name, error = %e, "closing disk panicked"),
    }
}

async fn open_disk(
    stores: &Arc<Stores>,
    state_dir: &Path,
    name: &str,
    disk: &DiskConfig,
) -> Result<Arc<Export>, DaemonError> {
    let fence = crate::jobs::backup::fence_path(&state_dir.join("fenced"), name);
    let fenced = fence.exists();
    if fenced {
        tracing::warn!(disk = name, fence = %fence.display(), "disk was migrated away; serving it read-only (remove the fence file to take it back)");
    }
    // The store opens writable unless the configuration says otherwise: a
    // fence is a state of the export, lifted (unfence, a rollback) without
    // reopening the disk.
    let options = OpenOptions { create_size: disk.size, read_only: disk.read_only };
    let (image, bitmaps, intent_region) = (disk.image.clone(), disk.bitmaps.clone(), disk.intent_region);
    let dir = state_dir.join("bitmaps").join(name);
    let disk_name = name.to_owned();
    let stores = stores.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let store = stores.open(&image, &options).map_err(DaemonError::store(&disk_name))?;
        let identity = store.identity().map_err(DaemonError::store(&disk_name))?;
        let tracked = DiskBitmaps::open(&dir, &disk_name, store.size(), identity, &bitmaps, intent_region)
            .map_err(|source| DaemonError::Bitmaps { disk: disk_name.clone(), source })?;
        Ok::<_, DaemonError>((store, tracked))
    })
    .await;
    let (store, tracked) = opened.unwrap_or_else(|e| Err(DaemonError::Panic(e.to_string())))?;
    if let Some(configured) = disk.size.filter(|&s| s < store.size()) {
        tracing::warn!(disk = name, configured, actual = store.size(), "image is larger than the configured size (grown by `rbdsync disk resize`?); serving it at its size: update size: in the VM file");
    }
    // Clients see the disk's name only: the image location (paths, pools)
    // is the operator's business, not every NBD client's.
    let description = format!("disk {name}");
    let export = Export::new(name.to_owned(), description, store, Arc::new(tracked), disk.read_only);
    if fenced {
        export.set_read_only();
    }
    Ok(Arc::new(export))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<(), DaemonError> {
    let io_err = |what: String| move |source| DaemonError::Io { what, source };
    std::fs::create_dir_all(&config.state_dir)
        .map_err(io_err(format!("Cannot create {}", config.state_dir.display())))?;
    let vms = config.load_vms()?;
    // Outgoing migrations call `https://` destinations with these.
    let mut credentials = api::client::Credentials::default();
    if let Some(m) = &config.migration {
        if m.client_cert.is_some() != m.client_key.is_some() {
            return Err(DaemonError::Io {
                what: "migration.client_cert and migration.client_key go together".into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        credentials = api::client::Credentials {
            ca_cert: m.ca_cert.clone(),
            token_file: m.token_file.clone(),
            client_cert: m.client_cert.clone().zip(m.client_key.clone()),
        };
    }
    // Point-in-time scratch files belong to jobs of an earlier run; those
    // jobs are concluded as interrupted below, so the files are garbage.
    let _ = std::fs::remove_dir_all(config.state_dir.join("scratch"));
    let exports = Arc::new(Exports::default());
    let stores = Stores::new(config.ceph.clone());
    let incoming = Arc::new(Incoming::default());
    let migrations_dir = config.state_dir.join("migrations");
    let migration_records = MigrationEnv::load_records(&migrations_dir, &incoming);
    crate::api::restore::load_markers(&config.state_dir, &incoming);
    let jobs = JobManager::load(&config.state_dir.join("jobs"))
        .map_err(io_err(format!("Cannot read {}", config.state_dir.join("jobs").display())))?;
    jobs.limits().set(config.jobs.max_running, config.jobs.max_rate);
    let mut disks = Disks {
        state_dir: config.state_dir.clone(),
        stores,
        incoming: incoming.clone(),
        jobs: jobs.clone(),
        exports,
        configs: BTreeMap::new(),
    };
    // Fences a restart must find in place before any disk is served (see `fences_due_at_start`).
    let outgoing = api::OutgoingEnv::load(
        config.state_dir.join("migrations").join("outgoing"),
        jobs.events().clone(),
        Arc::new(credentials),
    );
    let due = outgoing.fences_due_at_start();
    for (disk, target) in &due {
        let fence = crate::jobs::backup::fence_path(&config.state_dir.join("fenced"), disk);
        if let Err(e) = crate::jobs::mirror::write_fence(&fence, disk, target) {
            tracing::error!(disk = %disk, error = %e, "cannot fence a disk whose first-io migration was cutting over");
        }
    }
    let count: usize = vms.iter().map(|vm| vm.disks.len()).sum();
    // Opening an RBD disk can take seconds: more time than the unit's start timeout allows.
    crate::systemd::extend_start(Duration::from_secs(30 + 5 * count as u64), &format!("opening {count} disks"));
    if let Err(e) = disks.apply(&vms).await {
        disks.close_all().await;
        return Err(e);
    }
    // Read-only before any listener starts, even where the fence could not be written.
    for (disk, _) in &due {
        if let Some(export) = disks.exports.get(disk) {
            export.set_read_only();
        }
    }

    let tls = match Tls::load(config.nbd.tls.as_ref()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            disks.close_all().await;
            return Err(DaemonError::Tls(e));
        }
    };
    let env = BackupEnv {
        fence_dir: config.state_dir.join("fenced"),
        tls: tls.clone(),
        stores: disks.stores.clone(),
        scratch_dir: config.state_dir.join("scratch"),
        node: config.node.clone(),
        mirror_reconnect_secs: config.nbd.client_reconnect_secs,
        nbd_client_timeout: Duration::from_secs(config.nbd.client_timeout_secs),
    };
    let control = Arc::new(Control::new(config.node.clone(), disks.exports.clone(), jobs.clone(), env));
    control.set_vms(vms);
    let shutdown = CancellationToken::new();
    let started = start_servers(&config, control.clone(), &jobs, &disks, tls.clone(), shutdown.clone()).await;
    let (server, (control_task, control_addrs)) = match started {
        Ok(servers) => servers,
        Err(e) => {
            disks.close_all().await;
            return Err(e);
        }
    };
    let runtime = RuntimeFile::write(&config, &server, &control_addrs)?;
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    control.set_migration_env(MigrationEnv {
        vms_dir: config.vms_dir.clone(),
        images_dir: config.state_dir.join("images"),
        incoming,
        reload: reload_tx,
        nbd: arc_swap::ArcSwap::from_pointee(server.local_addrs().iter().map(|a| a.to_string()).collect()),
        nbd_tls: tls.policy() != proto::TlsPolicy::Unavailable,
        records: std::sync::Mutex::new(migration_records),
        dir: migrations_dir,
        state_dir: config.state_dir.clone(),
        steps: tokio::sync::Mutex::new(()),
        events: jobs.events().clone(),
    });
    control.set_outgoing_env(outgoing);
    control.recover_outgoing().await;
    let serving = tokio::spawn(server.run(shutdown.clone()));
    tracing::info!(node = %config.node, exports = disks.configs.len(), "agent started");
    crate::systemd::ready(&serving_status(&disks));
    crate::systemd::spawn_watchdog(shutdown.clone());

    let mut term = signal(SignalKind::terminate()).map_err(io_err("Cannot install SIGTERM handler".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("Cannot install SIGINT handler".into()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("Cannot install SIGHUP handler".into()))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::systemd::reloading();
                reload_job_limits(&config, &jobs);
                let reloaded = reload(&config, &mut disks, &control).await;
                if let Err(e) = tls.reload() {
                    tracing::error!(error = %e, "TLS reload failed; keeping the previous certificates");
                }
                let status = serving_status(&disks);
                crate::systemd::ready(&match reloaded {
                    Ok(()) => status,
                    Err(e) => format!("{status}; the last reload failed: {e}"),
                });
            }
            Some(reply) = reload_rx.recv() => {
                let _ = reply.send(reload(&config, &mut disks, &control).await.map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e))));
                crate::systemd::ready(&serving_status(&disks));
            }
        }
    }
    crate::systemd::stopping();
    tracing::info!("stopping: cancelling jobs, draining connections");
    jobs.shutdown().await;
    shutdown.cancel();
    let _ = serving.await;
    // A control client that stopped reading (a suspended `rbdsync events`) must not keep the
    // bitmaps from being saved: past 10 s its connection is dropped.
    let aborter = control_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(10), control_task).await.is_err() {
        tracing::warn!("control connections still open after 10 s; closing them");
        aborter.abort();
    }
    disks.close_all().await;
    runtime.remove();
    tracing::info!("agent stopped");
    Ok(())
}

/// The `STATUS=` line while serving.
fn serving_status(disks: &Disks) -> String {
    format!("serving {} disks", disks.configs.len())
}

async fn start_servers(
    config: &AgentConfig,
    control: Arc<Control>,
    jobs: &Arc<JobManager>,
    disks: &Disks,
    tls: Arc<Tls>,
    shutdown: CancellationToken,
) -> Result<(NbdServer, api::http::Served), DaemonError> {
    let metrics = Metrics::new();
    let server = NbdServer::bind(&server_settings(config), disks.exports.clone(), metrics.clone(), tls.clone()).await?;
    let control = api::http::serve(&config.control, control, shutdown.clone()).await?;
    if let Some(m) = &config.metrics {
        metrics::serve(m.listen, metrics, disks.exports.clone(), jobs.clone(), shutdown)
            .await
            .map_err(|source| DaemonError::Io { what: format!("Cannot serve metrics on {}", m.listen), source })?;
    }
    Ok((server, control))
}

async fn reload(config: &AgentConfig, disks: &mut Disks, control: &Control) -> Result<(), DaemonError> {
    tracing::info!("SIGHUP: reloading VM files");
    let result = match config.load_vms() {
        Ok(vms) => {
            let applied = disks.apply(&vms).await;
            control.set_vms(vms);
            applied
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, cause = ?std::error::Error::source(e), "reload failed; keeping the previous configuration");
    }
    result
}

/// Applies `jobs:` of `agent.yaml` as it is now (the one section a reload
/// re-reads; the rest needs a restart).
fn reload_job_limits(config: &AgentConfig, jobs: &JobManager) {
    if config.source == std::path::Path::new(crate::config::EMBEDDED_SOURCE) {
        return;
    }
    match AgentConfig::load(&config.source) {
        Ok(now) => {
            jobs.limits().set(now.jobs.max_running, now.jobs.max_rate);
            tracing::info!(max_running = now.jobs.max_running, max_rate = now.jobs.max_rate, "job limits applied");
        }
        Err(e) => tracing::error!(error = %e, "cannot re-read {}; keeping the job limits", config.source.display()),
    }
}

fn server_settings(config: &AgentConfig) -> ServerSettings {
    let nbd = &config.nbd;
    let mut handshake = proto::HandshakeConfig::default();
    handshake.block_sizes.maximum = nbd.max_payload;
    ServerSettings {
        listen: nbd.listen.clone(),
        handshake,
        handshake_timeout: Duration::from_secs(nbd.handshake_timeout_secs),
        max_connections: usize::try_from(nbd.max_connections).unwrap_or(usize::MAX),
        max_per_export: usize::try_from(nbd.max_connections_per_export).unwrap_or(usize::MAX),
        idle_timeout: (nbd.idle_timeout_secs > 0).then(|| Duration::from_secs(nbd.idle_timeout_secs)),
        incoming_timeout: Duration::from_secs(nbd.incoming_io_timeout_secs),
    }
}

/// `STATE_DIR/agent.json`: pid and bound addresses of the running agent.
struct RuntimeFile(PathBuf);

impl RuntimeFile {
    fn write(config: &AgentConfig, server: &NbdServer, control: &[String]) -> Result<Self, DaemonError> {
        let path = config.state_dir.join("agent.json");
        let nbd: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
        let body =
            serde_json::json!({ "pid": std::process::id(), "node": config.node, "nbd": nbd, "control": control });
        let tmp = path.with_extension("json.tmp");
        let write = std::fs::write(&tmp, body.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
        write.map_err(|source| DaemonError::Io { what: format!("Cannot write {}", path.display()), source })?;
        Ok(Self(path))
    }

    fn remove(self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
