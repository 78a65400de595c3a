//! HTTP client of the control API, used by the CLI.

use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where the control API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// `http://host:port`.
    Http(String),
    /// `https://host:port` (TLS, with these credentials).
    Https(String, Arc<Credentials>),
}

impl Endpoint {
    /// The same endpoint, calling with `credentials` if it is `https://`.
    #[must_use]
    pub fn with_credentials(self, credentials: &Arc<Credentials>) -> Self {
        match self {
            Endpoint::Https(addr, _) => Endpoint::Https(addr, credentials.clone()),
            other => other,
        }
    }
}

/// How a client authenticates to a TCP control API and what it trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// CA certificate(s) (PEM) that signed the agent's certificate.
    pub ca_cert: Option<PathBuf>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Client certificate and key (PEM), if the agent checks certificates.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            return Ok(Endpoint::Http(rest.trim_end_matches('/').to_owned()));
        }
        if let Some(rest) = s.strip_prefix("https://") {
            return Ok(Endpoint::Https(rest.trim_end_matches('/').to_owned(), Arc::default()));
        }
        Err(format!("bad control address {s:?} (expected unix:/path or https://host:port)"))
    }
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot connect.
    #[error("Cannot reach the agent at {0}")]
    Connect(String, #[source] std::io::Error),
    /// HTTP failed.
    #[error("Control API request failed: {0}")]
    Http(String),
    /// The agent answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
}

/// Sends one request and returns the JSON answer (`Null` for 204).
pub async fn call(endpoint: &Endpoint, method: &str, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
    let response = send(endpoint, method, path, body).await?;
    let status = response.status().as_u16();
    let http = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
    let bytes = response.into_body().collect().await.map_err(|e| http(&e))?.to_bytes();
    let value: Value =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).map_err(|e| http(&e))? };
    if status >= 400 {
        let code = value["error"]["code"].as_str().unwrap_or("unknown").to_owned();
        let message = value["error"]["message"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned);
        return Err(ClientError::Api { status, code, message });
    }
    Ok(value)
}

/// Follows `GET /v1/events`: calls `on` with each event's JSON until the
/// agent ends the stream (it stops) or `on` returns false.
pub async fn follow_events(endpoint: &Endpoint, mut on: impl FnMut(Value) -> bool) -> Result<(), ClientError> {
    let response = send(endpoint, "GET", "/v1/events", None).await?;
    let http = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
    if response.status().as_u16() >= 400 {
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| http(&e))?.to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let code = value["error"]["code"].as_str().unwrap_or("unknown").to_owned();
        let message = value["error"]["message"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned);
        return Err(ClientError::Api { status, code, message });
    }
    let mut body = response.into_body();
    let (mut pending, mut data) = (Vec::new(), String::new());
    // The agent sends a keep-alive every 15 s: silence for much longer is a dead connection.
    let silence = std::time::Duration::from_secs(60);
    while let Some(frame) = tokio::time::timeout(silence, body.frame())
        .await
        .map_err(|_| ClientError::Http("no event or keep-alive for 60 s: connection lost".into()))?
    {
        let Ok(chunk) = frame.map_err(|e| http(&e))?.into_data() else { continue };
        pending.extend_from_slice(&chunk);
        if pending.len() > 1 << 20 {
            return Err(ClientError::Http("an event line over 1 MiB: not an rbdsync agent's event stream".into()));
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let Ok(event) = serde_json::from_str(&std::mem::take(&mut data)) else { continue };
                if !on(event) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Connects and sends one request; the response with its body unread.
async fn send(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    let http = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
    let (io, host) = match endpoint {
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| ClientError::Connect(format!("unix:{}", p.display()), e))?;
            (TokioIo::new(Box::new(s) as Box<dyn Io>), "localhost".to_owned())
        }
        Endpoint::Http(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(addr.clone(), e))?;
            (TokioIo::new(Box::new(s) as Box<dyn Io>), addr.clone())
        }
        Endpoint::Https(addr, credentials) => {
            let (config, name) = tls_client(credentials, addr)?;
            let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| ClientError::Connect(addr.clone(), e))?;
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(name, s)
                .await
                .map_err(|e| ClientError::Connect(format!("https://{addr} (TLS)"), e))?;
            (TokioIo::new(Box::new(s) as Box<dyn Io>), addr.clone())
        }
    };
    let token = match endpoint {
        Endpoint::Https(_, credentials) => bearer_token(credentials)?,
        _ => None,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request =
        Request::builder().method(method).uri(path).header("host", host).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::from(payload))).map_err(|e| http(&e))?;
    sender.send_request(request).await.map_err(|e| http(&e))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The token from the credentials' token file, if any.
fn bearer_token(credentials: &Credentials) -> Result<Option<String>, ClientError> {
    let Some(path) = credentials.token_file.clone() else { return Ok(None) };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ClientError::Http(format!("cannot read token file {}: {e}", path.display())))?;
    Ok(Some(text.lines().next().unwrap_or_default().trim().to_owned()))
}

/// TLS client configuration and server name for `addr` (`host:port`).
fn tls_client(
    c: &Credentials,
    addr: &str,
) -> Result<(Arc<rustls::ClientConfig>, rustls_pki_types::ServerName<'static>), ClientError> {
    use rustls_pki_types::ServerName;
    let bad = |e: crate::tls::TlsError| ClientError::Http(e.to_string());
    let roots = crate::tls::roots(c.ca_cert.as_deref()).map_err(bad)?;
    let identity = c.client_cert.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
    let mut config = crate::tls::client_config(roots, identity).map_err(bad)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Http(format!("bad host in https://{addr}: {e}")))?;
    Ok((Arc::new(config), name))
}
