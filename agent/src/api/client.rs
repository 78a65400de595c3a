//! HTTP client of the control API, used by the CLI.

use std::path::PathBuf;

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
        if s.starts_with("https://") {
            return Err("https:// control endpoints need TLS support, which is not built yet".into());
        }
        Err(format!("bad control address {s:?} (expected unix:/path or http://host:port)"))
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
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| http(&e))?;
    tokio::spawn(conn);
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| http(&e))?;
    let response = sender.send_request(request).await.map_err(|e| http(&e))?;
    let status = response.status().as_u16();
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

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
