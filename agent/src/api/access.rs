//! Who may use the control API.
//!
//! - **Unix socket** (the default): mode 0600, and each connection's peer
//!   (`SO_PEERCRED`) must be root or the agent's own user.
//! - **TCP**: always TLS (`control.tls`), and each request must carry
//!   `Authorization: Bearer TOKEN` matching `control.token_file` (compared
//!   in constant time), unless the connection presented a client
//!   certificate signed by `control.tls.client_ca`. Without `token_file`
//!   that certificate is mandatory (checked in the TLS handshake). A TCP
//!   listener without TLS or without either credential does not start.
//!
//! TLS handshakes run off the accept loop, at most [`MAX_HANDSHAKES`] at a
//! time, each within [`HANDSHAKE_TIMEOUT`], so a slow or silent client
//! cannot block others.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::http::ServeError;
use crate::config::{ControlConfig, ControlTlsConfig};
use crate::export::constant_time_eq;

/// TLS handshakes in progress at once, per listener.
pub const MAX_HANDSHAKES: usize = 64;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest token accepted from `token_file`.
pub const MIN_TOKEN_LEN: usize = 16;

/// Credentials TCP clients are checked against.
pub struct TcpAccess {
    acceptor: TlsAcceptor,
    token: Option<String>,
}

impl std::fmt::Debug for TcpAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpAccess").field("token", &self.token.as_ref().map(|_| "<redacted>")).finish_non_exhaustive()
    }
}

impl TcpAccess {
    /// Loads `control.tls` and `control.token_file`; refuses a setup that
    /// would let anyone in.
    pub fn load(config: &ControlConfig, addr: SocketAddr) -> Result<Self, ServeError> {
        let Some(tls) = &config.tls else { return Err(ServeError::InsecureTcp(addr.to_string())) };
        if config.token_file.is_none() && tls.client_ca.is_none() {
            return Err(ServeError::NoCredential(addr.to_string()));
        }
        let token = config.token_file.as_deref().map(load_token).transpose()?;
        let server = server_config(tls, token.is_some())?;
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(server)), token })
    }
}

/// Reads the bearer token: the file's first line, trimmed; the file must
/// not be readable by group or others.
fn load_token(path: &Path) -> Result<String, ServeError> {
    let bad = |reason: String| ServeError::Token { path: path.display().to_string(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!("readable by others (mode {:o}); chmod 600 it", meta.permissions().mode() & 0o777)));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(format!("the token must be at least {MIN_TOKEN_LEN} printable characters without spaces")));
    }
    Ok(token)
}

/// Server TLS; with `client_ca`, client certificates are verified, and
/// mandatory unless a token can stand in for them.
fn server_config(c: &ControlTlsConfig, token: bool) -> Result<ServerConfig, ServeError> {
    use crate::tls::ClientAuth;
    let clients = match &c.client_ca {
        Some(ca) if token => ClientAuth::Optional(ca),
        Some(ca) => ClientAuth::Required(ca),
        None => ClientAuth::None,
    };
    let mut config = crate::tls::server_config(&c.cert, &c.key, clients)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TCP client after its TLS handshake.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// It presented a certificate the CA signed (rustls verified it).
    pub certified: bool,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        *stream.remote_addr()
    }
}

/// Accepts TCP connections, runs TLS handshakes concurrently, yields the
/// finished ones.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` until `stop`.
    pub fn start(listener: TcpListener, access: &TcpAccess, stop: CancellationToken) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = access.acceptor.clone();
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "control API: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let certified = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                            let _ = tx.send((tls, Peer { addr, certified })).await;
                        }
                        Ok(Err(e)) => tracing::info!(%addr, error = %e, "control API: TLS handshake failed"),
                        Err(_) => tracing::info!(%addr, "control API: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, certified: false })
    }
}

/// Middleware of TCP routes: a certified peer or the bearer token.
pub async fn authorize(
    State(access): State<Arc<TcpAccess>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    if peer.certified {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let valid = match (presented, &access.token) {
        (Some(p), Some(t)) => constant_time_eq(p.as_bytes(), t.as_bytes()),
        _ => false,
    };
    if valid {
        return next.run(request).await;
    }
    tracing::info!(peer = %peer.addr, presented = presented.is_some(), "control API: request refused (no valid token)");
    let mut response = super::http::error(super::ApiError::Unauthorized).into_response();
    response.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    response
}

/// A Unix listener that drops connections from other users.
pub struct OwnerOnly(pub UnixListener);

impl Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == 0 || cred.uid() == me => return (stream, addr),
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid(), "control socket: connection from another user refused")
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket: cannot read peer credentials"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}
