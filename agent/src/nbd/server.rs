//! Listeners and the accept loop.
//!
//! One task per listener accepts connections; one task per connection runs
//! [`connection`](super::connection). A semaphore caps concurrent
//! connections; a [`CancellationToken`] stops accepting and tells every
//! connection to drain; a [`TaskTracker`] lets shutdown wait for them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connection::{negotiate, transmit, ConnContext, ConnError, Negotiation, Peer};
use crate::config::ListenAddr;
use crate::export::Exports;

/// Server settings derived from the `nbd:` config section.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Addresses to listen on.
    pub listen: Vec<ListenAddr>,
    /// Negotiation settings.
    pub handshake: proto::HandshakeConfig,
    /// Time allowed for negotiation.
    pub handshake_timeout: Duration,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Most concurrent connections to one export.
    pub max_per_export: usize,
    /// Close connections idle this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Longest a request on an incoming export waits for the cut-over.
    pub incoming_timeout: Duration,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding a listener failed.
    #[error("Cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A Unix socket path is served by a running process.
    #[error("Socket {0} is in use by another process")]
    SocketInUse(PathBuf),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound NBD server, ready to run.
pub struct NbdServer {
    listeners: Vec<Listener>,
    ctx: Arc<ConnContext>,
    max_connections: usize,
}

impl NbdServer {
    /// Binds every listener (port 0 picks a free port).
    pub async fn bind(
        settings: &ServerSettings,
        exports: Arc<Exports>,
        metrics: Arc<crate::metrics::Metrics>,
        tls: Arc<super::tls::Tls>,
    ) -> Result<Self, ServerError> {
        let mut listeners = Vec::new();
        for addr in &settings.listen {
            listeners.push(bind_one(addr).await?);
        }
        let mut handshake = settings.handshake;
        handshake.tls = tls.policy();
        let ctx = ConnContext {
            exports,
            handshake,
            handshake_timeout: settings.handshake_timeout,
            metrics,
            tls,
            max_per_export: settings.max_per_export,
            idle_timeout: settings.idle_timeout,
            incoming_timeout: settings.incoming_timeout,
        };
        Ok(Self { listeners, ctx: Arc::new(ctx), max_connections: settings.max_connections })
    }

    /// The addresses actually bound (TCP ports resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t) => t.local_addr().ok().map(ListenAddr::Tcp),
                Listener::Unix(_, p) => Some(ListenAddr::Unix(p.clone())),
            })
            .collect()
    }

    /// Accepts until `shutdown`, then waits for every connection to drain.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        for listener in self.listeners {
            // Each listener has its own pool, so remote clients can never
            // lock the local (Unix socket) clients out.
            let limit = Arc::new(Semaphore::new(self.max_connections));
            let acceptor = Acceptor { ctx: self.ctx.clone(), limit, tracker: tracker.clone() };
            tracker.spawn(acceptor.run(listener, shutdown.clone()));
        }
        tracker.close();
        tracker.wait().await;
    }
}

async fn bind_one(addr: &ListenAddr) -> Result<Listener, ServerError> {
    let bind_err = |source| ServerError::Bind { addr: addr.to_string(), source };
    match addr {
        ListenAddr::Tcp(sa) => Ok(Listener::Tcp(TcpListener::bind(sa).await.map_err(bind_err)?)),
        ListenAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(bind_err)?;
            }
            if path.exists() {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(ServerError::SocketInUse(path.clone()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Ok(Listener::Unix(UnixListener::bind(path).map_err(bind_err)?, path.clone()))
        }
    }
}

#[derive(Clone)]
struct Acceptor {
    ctx: Arc<ConnContext>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Acceptor {
    async fn run(self, listener: Listener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = accept(&listener) => accepted,
            };
            match accepted {
                Ok(conn) => self.start(conn, shutdown.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
    }

    fn start(&self, conn: Accepted, shutdown: CancellationToken) {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            tracing::warn!(peer = %conn.peer(), "connection limit reached, closing new connection");
            return;
        };
        let ctx = self.ctx.clone();
        let span = tracing::info_span!("nbd", peer = %conn.peer());
        self.tracker.spawn(
            async move {
                if let Err(e) = conn.serve(&ctx, shutdown).await {
                    tracing::info!(error = %e, cause = ?std::error::Error::source(&e), "connection ended");
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

enum Accepted {
    Tcp(TcpStream, std::net::SocketAddr),
    Unix(UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            stream.set_nodelay(true)?;
            Ok(Accepted::Tcp(stream, peer))
        }
        Listener::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

impl Accepted {
    fn peer(&self) -> String {
        match self {
            Accepted::Tcp(_, peer) => peer.to_string(),
            Accepted::Unix(_) => "unix".to_owned(),
        }
    }

    async fn serve(self, ctx: &ConnContext, shutdown: CancellationToken) -> Result<(), ConnError> {
        match self {
            Accepted::Tcp(stream, addr) => {
                let peer = Peer::new(Some(addr.ip()));
                serve_conn(stream, ctx, peer, shutdown, |s| box_split(s.into_split())).await
            }
            Accepted::Unix(stream) => {
                serve_conn(stream, ctx, Peer::new(None), shutdown, |s| box_split(s.into_split())).await
            }
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn box_split<R, W>((r, w): (R, W)) -> (BoxRead, BoxWrite)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    (Box::new(r), Box::new(w))
}

fn in_time<T>(r: Result<T, tokio::time::error::Elapsed>) -> Result<T, ConnError> {
    r.map_err(|_| ConnError::HandshakeTimeout)
}

/// Negotiates (upgrading to TLS on STARTTLS), then transmits; `local` for
/// Unix sockets, where `tls: required` relaxes to optional. The whole
/// negotiation, TLS handshake included, must finish within the timeout.
async fn serve_conn<S>(
    mut stream: S,
    ctx: &ConnContext,
    mut peer: Peer,
    shutdown: CancellationToken,
    split: fn(S) -> (BoxRead, BoxWrite),
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let mut config = ctx.handshake;
    if peer.ip.is_none() && config.tls == proto::TlsPolicy::Required {
        // A Unix socket is protected by file permissions; local clients
        // (the VM's QEMU) may skip TLS there.
        config.tls = proto::TlsPolicy::Optional;
    }
    let mut hs = proto::ServerHandshake::new(config);
    let mut buf = BytesMut::with_capacity(64 << 10);
    let first =
        in_time(tokio::time::timeout_at(deadline, negotiate(&mut stream, &mut hs, ctx, &peer, &mut buf, true)).await)??;
    match first {
        Negotiation::Aborted => Ok(()),
        Negotiation::Done(negotiated) => {
            tracing::debug!(export = %negotiated.export.name, structured = negotiated.structured_replies, "negotiated");
            let (reader, writer) = split(stream);
            transmit(reader, writer, buf, *negotiated, ctx, &peer, shutdown).await
        }
        Negotiation::StartTls => {
            if !buf.is_empty() {
                return Err(ConnError::Protocol(proto::DecodeError::Invalid("data after STARTTLS")));
            }
            let acceptor = ctx.tls.acceptor().ok_or(ConnError::TlsUnavailable)?;
            let mut tls =
                in_time(tokio::time::timeout_at(deadline, acceptor.accept(stream)).await)?.map_err(ConnError::Tls)?;
            hs.tls_started();
            peer.cn = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
            let round = in_time(
                tokio::time::timeout_at(deadline, negotiate(&mut tls, &mut hs, ctx, &peer, &mut buf, false)).await,
            )??;
            let Negotiation::Done(negotiated) = round else { return Ok(()) };
            tracing::debug!(export = %negotiated.export.name, "negotiated over TLS");
            let (reader, writer) = tokio::io::split(tls);
            transmit(reader, writer, buf, *negotiated, ctx, &peer, shutdown).await
        }
    }
}

/// Subject CN of a DER certificate (rustls verified it already).
fn common_name(der: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}
