//! The agent process: builds exports from the VM files, runs the NBD
//! server, and reacts to signals (SIGTERM/SIGINT stop, SIGHUP reloads).
//!
//! Startup order: state dir → VM files → open every disk → bind listeners →
//! write `STATE_DIR/agent.json` (pid and bound addresses, for scripts and
//! tests) → serve. Shutdown: stop accepting → every connection drains its
//! in-flight requests → flush every writable disk → remove `agent.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, DiskConfig, VmConfig};
use crate::export::{Export, Exports};
use crate::nbd::server::ServerError;
use crate::nbd::{NbdServer, ServerSettings};
use crate::store::{self, OpenOptions, StoreError};

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

/// The disks the agent serves, with the config each was built from.
struct Disks {
    exports: Arc<Exports>,
    configs: BTreeMap<String, DiskConfig>,
}

impl Disks {
    /// Opens every disk of `vms`; fails on the first that cannot be opened.
    async fn open_all(vms: &[VmConfig]) -> Result<BTreeMap<String, (DiskConfig, Arc<Export>)>, DaemonError> {
        let mut out = BTreeMap::new();
        for vm in vms {
            for disk in &vm.disks {
                let name = format!("{}/{}", vm.name, disk.name);
                let export = open_disk(&name, disk).await?;
                out.insert(name, (disk.clone(), export));
            }
        }
        Ok(out)
    }

    /// Makes the served set equal `wanted`: adds, replaces changed, removes gone.
    fn apply(&mut self, wanted: BTreeMap<String, (DiskConfig, Arc<Export>)>) {
        let gone: Vec<String> = self.configs.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for name in gone {
            tracing::info!(disk = %name, "removing export");
            self.exports.remove(&name);
            self.configs.remove(&name);
        }
        for (name, (config, export)) in wanted {
            if self.configs.get(&name) == Some(&config) {
                continue;
            }
            tracing::info!(disk = %name, image = %config.image, "serving export");
            self.exports.insert(export);
            self.configs.insert(name, config);
        }
    }
}

async fn open_disk(name: &str, disk: &DiskConfig) -> Result<Arc<Export>, DaemonError> {
    let options = OpenOptions { create_size: disk.size, read_only: disk.read_only };
    let image = disk.image.clone();
    let opened = tokio::task::spawn_blocking(move || store::open(&image, &options)).await;
    let store = opened
        .unwrap_or_else(|e| Err(StoreError::Unsupported(if e.is_panic() { "open (panicked)" } else { "open" })))
        .map_err(|source| DaemonError::Disk { disk: name.to_owned(), source })?;
    let description = format!("{} ({})", name, disk.image);
    Ok(Arc::new(Export::new(name.to_owned(), description, store, disk.read_only)))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<(), DaemonError> {
    let io_err = |what: String| move |source| DaemonError::Io { what, source };
    std::fs::create_dir_all(&config.state_dir)
        .map_err(io_err(format!("Cannot create {}", config.state_dir.display())))?;
    let vms = config.load_vms()?;
    let mut disks = Disks { exports: Arc::new(Exports::default()), configs: BTreeMap::new() };
    disks.apply(Disks::open_all(&vms).await?);

    let server = NbdServer::bind(&server_settings(&config), disks.exports.clone()).await?;
    let runtime = RuntimeFile::write(&config, &server)?;
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.run(shutdown.clone()));
    tracing::info!(node = %config.node, exports = disks.configs.len(), "agent started");

    let mut term = signal(SignalKind::terminate()).map_err(io_err("Cannot install SIGTERM handler".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("Cannot install SIGINT handler".into()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("Cannot install SIGHUP handler".into()))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&config, &mut disks).await,
        }
    }
    tracing::info!("stopping: draining connections");
    shutdown.cancel();
    let _ = serving.await;
    flush_all(&disks.exports).await;
    runtime.remove();
    tracing::info!("agent stopped");
    Ok(())
}

async fn reload(config: &AgentConfig, disks: &mut Disks) {
    tracing::info!("SIGHUP: reloading VM files");
    let wanted = match config.load_vms() {
        Ok(vms) => Disks::open_all(&vms).await,
        Err(e) => Err(e.into()),
    };
    match wanted {
        Ok(wanted) => disks.apply(wanted),
        Err(e) => {
            tracing::error!(error = %e, cause = ?std::error::Error::source(&e), "reload failed; keeping the previous configuration")
        }
    }
}

async fn flush_all(exports: &Exports) {
    for export in exports.list() {
        if export.read_only() {
            continue;
        }
        let store = export.store().clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(disk = export.name(), error = %e, "final flush failed"),
            Err(e) => tracing::error!(disk = export.name(), error = %e, "final flush panicked"),
        }
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
    }
}

/// `STATE_DIR/agent.json`: pid and bound addresses of the running agent.
struct RuntimeFile(PathBuf);

impl RuntimeFile {
    fn write(config: &AgentConfig, server: &NbdServer) -> Result<Self, DaemonError> {
        let path = config.state_dir.join("agent.json");
        let nbd: Vec<String> = server.local_addrs().iter().map(|a| a.to_string()).collect();
        let body = serde_json::json!({ "pid": std::process::id(), "node": config.node, "nbd": nbd });
        let tmp = path.with_extension("json.tmp");
        let write = std::fs::write(&tmp, body.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
        write.map_err(|source| DaemonError::Io { what: format!("Cannot write {}", path.display()), source })?;
        Ok(Self(path))
    }

    fn remove(self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
