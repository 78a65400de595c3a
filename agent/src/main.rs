//! `rbdsync`: the agent daemon and its command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use agent::cli::{self, ClientCmd};
use agent::config::AgentConfig;

/// Keeps VM disks in sync with Ceph: NBD exports, dirty bitmaps, backups, migration.
#[derive(Debug, Parser)]
#[command(
    name = "rbdsync",
    version,
    about,
    after_help = "Exit status: 0 done, 1 other error, 2 bad arguments, 3 agent unreachable, 4 refused by the agent, \
                  5 a job or migration waited for failed, 6 verify found differences."
)]
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
        /// agent.yaml; without it /etc/rbdsync/agent.yaml when that exists,
        /// else the embedded example configuration (the first log line says which).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "RBDSYNC_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Print a shell completion script (e.g. `rbdsync completions bash >
    /// /usr/share/bash-completion/completions/rbdsync`).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; e.g. `rbdsync man > /usr/share/man/man1/rbdsync.1`).
    Man,
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
    let default = std::path::Path::new(cli::DEFAULT_AGENT_CONFIG);
    let config = match config {
        Some(path) => {
            tracing::info!(config = %path.display(), "configuration from --config");
            AgentConfig::load(&path)?
        }
        // Unreadable is not absent: running the demo configuration instead would be a surprise.
        None if default.try_exists().with_context(|| format!("Cannot check {}", default.display()))? => {
            tracing::info!(config = %default.display(), "no --config given: using the host's configuration");
            AgentConfig::load(default)?
        }
        None => {
            tracing::info!("no --config given and no {}: using the embedded example configuration", default.display());
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

/// The CLI's exit statuses (documented in the README and `rbdsync --help`).
mod exit {
    /// Anything else (the runtime would not start, the answer was not HTTP, ...).
    pub const OTHER: u8 = 1;
    /// Bad arguments (clap uses 2 for its own parse errors too).
    pub const USAGE: u8 = 2;
    /// The agent could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The agent refused the request (4xx: not found, conflict, bad request, unauthorized).
    pub const REFUSED: u8 = 4;
    /// A job or migration the command waited for failed or was cancelled.
    pub const FAILED: u8 = 5;
    /// `verify` ran and found differences.
    pub const DIFFERS: u8 = 6;
}

fn client_exit(e: &agent::api::client::ClientError) -> u8 {
    use agent::api::client::ClientError;
    match e {
        ClientError::Connect(..) => exit::UNREACHABLE,
        ClientError::Http(_) => exit::OTHER,
        ClientError::Api { code, .. } if code == "verify_differs" => exit::DIFFERS,
        ClientError::Api { code, .. } if code == "job_failed" || code == "migration_failed" => exit::FAILED,
        ClientError::Api { code, .. } if code == "usage" => exit::USAGE,
        ClientError::Api { status, .. } if (400..500).contains(status) => exit::REFUSED,
        ClientError::Api { .. } => exit::OTHER,
    }
}

fn run_client(
    control: Option<&str>,
    credentials: &std::sync::Arc<agent::api::client::Credentials>,
    json: bool,
    cmd: ClientCmd,
) -> Result<(), (u8, String, String)> {
    let endpoint = cli::resolve_endpoint(control).map_err(|e| (exit::USAGE, "usage".to_owned(), e))?;
    let endpoint = endpoint.with_credentials(credentials);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (exit::OTHER, "internal".to_owned(), format!("Cannot start runtime: {e}")))?;
    runtime.block_on(cli::run(&endpoint, json, cmd)).map_err(|e| {
        let code = match &e {
            agent::api::client::ClientError::Connect(..) => "unreachable".to_owned(),
            agent::api::client::ClientError::Http(_) => "http".to_owned(),
            agent::api::client::ClientError::Api { code, .. } => code.clone(),
        };
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        (client_exit(&e), code, message)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Agent { config, log_format } => run_agent(config, log_format),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "rbdsync",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .context("Cannot write the man page"),
        Cmd::Client(cmd) => {
            let credentials = std::sync::Arc::new(agent::api::client::Credentials {
                ca_cert: cli.ca_cert,
                token_file: cli.token_file,
                client_cert: cli.client_cert.zip(cli.client_key),
            });
            match run_client(cli.control.as_deref(), &credentials, cli.json, cmd) {
                Ok(()) => return ExitCode::SUCCESS,
                Err((status, code, message)) => {
                    if cli.json {
                        // Errors are JSON too with --json (on stderr, like the text form).
                        eprintln!("{}", serde_json::json!({ "error": { "code": code, "message": message } }));
                    } else {
                        eprintln!("rbdsync: {message}");
                    }
                    return ExitCode::from(status);
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdsync: {e:#}");
            ExitCode::from(exit::OTHER)
        }
    }
}
