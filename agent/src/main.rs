//! `rbdsync`: the agent daemon and its command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use agent::cli::{self, ClientCmd};
use agent::config::AgentConfig;

/// Keeps VM disks in sync with Ceph: NBD exports, dirty bitmaps, backups, migration.
#[derive(Debug, Parser)]
#[command(name = "rbdsync", version, about)]
struct Cli {
    /// Control API of the agent: unix:PATH or https://HOST:PORT
    /// (default: the control socket named in /etc/rbdsync/agent.yaml).
    #[arg(long, global = true, env = "RBDSYNC_CONTROL")]
    control: Option<String>,
    /// https: CA certificate(s) that signed the agents' certificates
    /// (default: the system store).
    #[arg(long, global = true, env = "RBDSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// https: file holding the bearer token (the agent's control.token_file).
    #[arg(long, global = true, env = "RBDSYNC_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// https: client certificate (PEM), for agents that check certificates.
    #[arg(long, global = true, env = "RBDSYNC_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// https: the client certificate's key (PEM).
    #[arg(long, global = true, env = "RBDSYNC_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Client(ClientCmd),
    /// Run the agent daemon in the foreground (logs to stderr).
    Agent {
        /// agent.yaml; without it the embedded example configuration is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "RBDSYNC_LOG_FORMAT")]
        log_format: LogFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBDSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Keeps request-sized buffers (up to the 32 MiB NBD payload) on the heap
/// so freed ones are reused, instead of glibc mapping and unmapping fresh,
/// page-faulting memory for every large request.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc allocator parameters; called once at startup before threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn run_agent(config: Option<PathBuf>, log_format: LogFormat) -> anyhow::Result<()> {
    tune_allocator();
    init_logging(log_format);
    let config = match config {
        Some(path) => AgentConfig::load(&path)?,
        None => {
            tracing::info!("no --config given: using the embedded example configuration");
            AgentConfig::embedded_default()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(128)
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
        .context("Cannot start runtime")?;
    runtime.block_on(agent::daemon::run(config))?;
    Ok(())
}

fn run_client(control: Option<&str>, json: bool, cmd: ClientCmd) -> anyhow::Result<()> {
    let endpoint = cli::resolve_endpoint(control).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("Cannot start runtime")?;
    runtime.block_on(cli::run(&endpoint, json, cmd))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Agent { config, log_format } => run_agent(config, log_format),
        Cmd::Client(cmd) => {
            agent::api::client::set_credentials(agent::api::client::Credentials {
                ca_cert: cli.ca_cert,
                token_file: cli.token_file,
                client_cert: cli.client_cert.zip(cli.client_key),
            });
            run_client(cli.control.as_deref(), cli.json, cmd)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
