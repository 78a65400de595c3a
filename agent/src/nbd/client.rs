//! A pipelined NBD client (tokio driver around `proto`'s client side): the
//! mirror's transport to another agent.
//!
//! One writer task sends requests in order; one reader task decodes replies
//! and completes each request's oneshot by cookie, so many requests can be
//! in flight at once. A semaphore bounds them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::client::{ClientHandshake, ClientNegotiated, ClientStep, ReplyDecoder, ReplyEvent};
use proto::consts::cmd_flags;
use proto::{Command, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests in flight per connection.
const IN_FLIGHT: usize = 64;

/// How this agent's NBD client connects: TLS for `nbds://` targets and how
/// long a connect (with negotiation) or one request may take
/// (`nbd.client_timeout_secs`: a stalled server fails the request, and the
/// client, instead of hanging the mirror and write-blocking writes).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Trust roots and the client certificate (`nbds://` needs them).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Connect and per-request limit.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { tls: None, timeout: Duration::from_secs(30) }
    }
}

/// Where an NBD export is: `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// `nbds://` / `nbds+unix://`: STARTTLS is required.
    pub tls: bool,
    /// TCP `host:port`, or None for a Unix socket.
    pub tcp: Option<String>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// Export name.
    pub export: String,
}

impl std::str::FromStr for NbdUri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = match s.strip_prefix("nbds") {
            Some(r) => (true, format!("nbd{r}")),
            None => (false, s.to_owned()),
        };
        if let Some(rest) = rest.strip_prefix("nbd+unix:///") {
            let (export, query) =
                rest.split_once("?socket=").ok_or_else(|| format!("{s}: nbd+unix needs ?socket=PATH"))?;
            return Ok(Self { tls, tcp: None, socket: Some(PathBuf::from(query)), export: export.to_owned() });
        }
        let rest = rest
            .strip_prefix("nbd://")
            .ok_or_else(|| format!("{s}: expected nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH"))?;
        let (host, export) = rest.split_once('/').ok_or_else(|| format!("{s}: no export name"))?;
        let host = if host.contains(':') { host.to_owned() } else { format!("{host}:10809") };
        Ok(Self { tls, tcp: Some(host), socket: None, export: export.to_owned() })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match (&self.tcp, &self.socket) {
            (Some(h), _) => write!(f, "nbd{s}://{h}/{}", self.export),
            (None, Some(p)) => write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display()),
            _ => write!(f, "nbd:?"),
        }
    }
}

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// Connecting or socket IO failed.
    #[error("NBD connection to {0} failed")]
    Io(String, #[source] std::io::Error),
    /// Negotiation failed.
    #[error("NBD negotiation with {0} failed")]
    Handshake(String, #[source] proto::client::ClientError),
    /// The server's replies are not NBD.
    #[error("NBD protocol error from server: {0}")]
    Protocol(proto::DecodeError),
    /// The server answered a request with an error.
    #[error("NBD server error {errno} at offset {offset}: {message}")]
    Server {
        /// NBD errno.
        errno: u32,
        /// Request offset.
        offset: u64,
        /// Server's message, if any.
        message: String,
    },
    /// The connection is closed.
    #[error("NBD connection closed")]
    Closed,
    /// The reply stream broke (garbage, a TLS error): the connection's state
    /// is unknown, requests sent on it may still be carried out.
    #[error("NBD connection broken: its state is unknown")]
    Broken,
    /// The server did not answer in time; the client is unusable.
    #[error("NBD server {0} did not answer within {1} s")]
    TimedOut(String, u64),
    /// An `nbds://` target but no TLS configured on this agent.
    #[error("{0} needs TLS, but this agent has no nbd.tls section")]
    NoTls(String),
    /// The TLS handshake failed.
    #[error("TLS with {0} failed")]
    Tls(String, #[source] std::io::Error),
}

type Reply = oneshot::Sender<Result<Bytes, NbdClientError>>;
type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn box_split<R, W>((r, w): (R, W)) -> (BoxRead, BoxWrite)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    (Box::new(r), Box::new(w))
}

/// Runs negotiation until it finishes or asks for TLS.
async fn round<S: AsyncRead + AsyncWrite + Unpin>(
    name: &str,
    hs: &mut ClientHandshake,
    stream: &mut S,
    input: &mut BytesMut,
) -> Result<ClientStep, NbdClientError> {
    let io = |e| NbdClientError::Io(name.to_owned(), e);
    let mut out = BytesMut::new();
    loop {
        let step = hs.handle(input, &mut out).map_err(|e| NbdClientError::Handshake(name.to_owned(), e))?;
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(io)?;
            out.clear();
        }
        if step != ClientStep::NeedMore {
            return Ok(step);
        }
        if stream.read_buf(input).await.map_err(io)? == 0 {
            return Err(NbdClientError::Io(name.to_owned(), std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

struct Pending {
    request: Request,
    payload: Bytes,
    reply: Reply,
}

#[derive(Default)]
struct InFlight {
    map: HashMap<u64, Entry>,
    /// The connection ended (no request sent from now on can be answered):
    /// `Some(true)` if it is gone for sure (end of stream, reset), `Some(false)`
    /// if its state is unknown (garbage or a TLS error on the reply stream:
    /// requests already sent may still be carried out).
    closed: Option<bool>,
}

impl InFlight {
    fn closed_error(gone: bool) -> NbdClientError {
        if gone {
            NbdClientError::Closed
        } else {
            NbdClientError::Broken
        }
    }
}

/// A request waiting for its reply.
struct Entry {
    request: Request,
    /// A READ's data so far (zero-filled where no chunk arrived yet).
    data: BytesMut,
    /// Bytes of a READ that chunks have covered.
    covered: u64,
    /// The chunks placed so far (start → end, relative to the request): a
    /// chunk may not overlap another, or coverage would count twice.
    chunks: std::collections::BTreeMap<usize, usize>,
    reply: Reply,
    error: Option<NbdClientError>,
}

/// A connected client.
#[derive(Debug)]
pub struct NbdClient {
    tx: mpsc::Sender<Pending>,
    info: ClientNegotiated,
    slots: Arc<Semaphore>,
    uri: NbdUri,
    /// A request timed out: the connection's state is unknown.
    broken: AtomicBool,
    /// Per-request limit.
    timeout: Duration,
}

impl NbdClient {
    /// Connects and negotiates; `nbds://` URIs need `options.tls` (trust
    /// roots and the client certificate to present).
    pub async fn connect(uri: &NbdUri, options: &ClientOptions) -> Result<Self, NbdClientError> {
        let limit = options.timeout;
        let mut client = tokio::time::timeout(limit, Self::connect_now(uri, options.tls.as_ref()))
            .await
            .unwrap_or_else(|_| Err(NbdClientError::TimedOut(uri.to_string(), limit.as_secs())))?;
        client.timeout = limit;
        Ok(client)
    }

    async fn connect_now(uri: &NbdUri, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Self, NbdClientError> {
        let name = uri.to_string();
        let io = |e| NbdClientError::Io(name.clone(), e);
        let tls = match (uri.tls, tls) {
            (true, Some(c)) => Some(c.clone()),
            (true, None) => return Err(NbdClientError::NoTls(name)),
            (false, _) => None,
        };
        match (&uri.tcp, &uri.socket) {
            (Some(addr), _) => {
                let s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
                s.set_nodelay(true).map_err(io)?;
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |h| h.0).trim_matches(['[', ']']).to_owned();
                Self::negotiate(uri, s, tls, host, |s| box_split(s.into_split())).await
            }
            (None, Some(path)) => {
                let s = tokio::net::UnixStream::connect(path).await.map_err(io)?;
                Self::negotiate(uri, s, tls, "localhost".to_owned(), |s| box_split(s.into_split())).await
            }
            _ => Err(NbdClientError::Closed),
        }
    }

    async fn negotiate<S>(
        uri: &NbdUri,
        mut stream: S,
        tls: Option<Arc<rustls::ClientConfig>>,
        host: String,
        split: fn(S) -> (BoxRead, BoxWrite),
    ) -> Result<Self, NbdClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = uri.to_string();
        let mut hs = ClientHandshake::new(&uri.export, true, tls.is_some());
        let mut input = BytesMut::with_capacity(4096);
        match round(&name, &mut hs, &mut stream, &mut input).await? {
            ClientStep::Done(info) => {
                let (r, w) = split(stream);
                Ok(Self::start(uri, r, w, input, info))
            }
            ClientStep::StartTls => {
                let config = tls.ok_or(NbdClientError::NoTls(name.clone()))?;
                let server = rustls_pki_types::ServerName::try_from(host)
                    .map_err(|e| NbdClientError::Tls(name.clone(), std::io::Error::other(e)))?;
                let mut tls = tokio_rustls::TlsConnector::from(config)
                    .connect(server, stream)
                    .await
                    .map_err(|e| NbdClientError::Tls(name.clone(), e))?;
                let mut out = BytesMut::new();
                hs.tls_started(&mut out).map_err(|e| NbdClientError::Handshake(name.clone(), e))?;
                tls.write_all(&out).await.map_err(|e| NbdClientError::Io(name.clone(), e))?;
                match round(&name, &mut hs, &mut tls, &mut input).await? {
                    ClientStep::Done(info) => {
                        let (r, w) = tokio::io::split(tls);
                        Ok(Self::start(uri, Box::new(r), Box::new(w), input, info))
                    }
                    _ => Err(NbdClientError::Closed),
                }
            }
            ClientStep::NeedMore => Err(NbdClientError::Closed),
        }
    }

    fn start(uri: &NbdUri, r: BoxRead, w: BoxWrite, input: BytesMut, info: ClientNegotiated) -> Self {
        let inflight = Arc::new(Mutex::new(InFlight::default()));
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(send_loop(w, rx, inflight.clone()));
        tokio::spawn(receive_loop(r, input, inflight));
        Self {
            tx,
            info,
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            uri: uri.clone(),
            broken: AtomicBool::new(false),
            timeout: ClientOptions::default().timeout,
        }
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The server's minimum block size: requests must be aligned to it (1
    /// if the server named none).
    pub fn min_block(&self) -> u64 {
        self.info.block_sizes.map_or(1, |(min, _, _)| u64::from(min)).max(1).next_power_of_two()
    }

    /// Where it is connected.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    async fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Bytes,
    ) -> Result<Bytes, NbdClientError> {
        let limit = self.timeout;
        if self.broken.load(SeqCst) {
            return Err(NbdClientError::TimedOut(self.uri.to_string(), limit.as_secs()));
        }
        let call = async {
            let _slot = self.slots.acquire().await.map_err(|_| NbdClientError::Closed)?;
            let (reply, rx) = oneshot::channel();
            let request = Request { cookie: 0, command, flags, offset, length };
            self.tx.send(Pending { request, payload, reply }).await.map_err(|_| NbdClientError::Closed)?;
            rx.await.map_err(|_| NbdClientError::Closed)?
        };
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => {
                self.broken.store(true, SeqCst);
                tracing::warn!(server = %self.uri, secs = limit.as_secs(), "NBD request timed out; connection given up");
                Err(NbdClientError::TimedOut(self.uri.to_string(), limit.as_secs()))
            }
        }
    }

    /// Writes `data` at `offset` (FUA if `fua`).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdClientError> {
        let len = u32::try_from(data.len()).map_err(|_| NbdClientError::Closed)?;
        let flags = if fua { cmd_flags::FUA } else { 0 };
        self.call(Command::Write, flags, offset, len, data).await.map(drop)
    }

    /// Zeroes a range (may punch holes).
    pub async fn write_zeroes(&self, offset: u64, length: u32) -> Result<(), NbdClientError> {
        self.call(Command::WriteZeroes, 0, offset, length, Bytes::new()).await.map(drop)
    }

    /// Reads a range.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, NbdClientError> {
        self.call(Command::Read, 0, offset, length, Bytes::new()).await
    }

    /// Flushes the server.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        self.call(Command::Flush, 0, 0, 0, Bytes::new()).await.map(drop)
    }

    /// Sends NBD_CMD_DISC (after in-flight requests were answered).
    pub async fn disconnect(self) {
        let all = self.slots.acquire_many(u32::try_from(IN_FLIGHT).unwrap_or(1));
        if self.broken.load(SeqCst) || tokio::time::timeout(self.timeout, all).await.is_err() {
            return;
        }
        let (reply, _rx) = oneshot::channel();
        let request = Request { cookie: 0, command: Command::Disc, flags: 0, offset: 0, length: 0 };
        let _ = self.tx.send(Pending { request, payload: Bytes::new(), reply }).await;
    }
}

async fn send_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Pending>, inflight: Arc<Mutex<InFlight>>) {
    static COOKIES: AtomicU64 = AtomicU64::new(1);
    let mut buf = BytesMut::new();
    while let Some(mut p) = rx.recv().await {
        p.request.cookie = COOKIES.fetch_add(1, SeqCst);
        buf.clear();
        p.request.encode(&mut buf);
        let disc = p.request.command == Command::Disc;
        if disc && inflight.lock().unwrap_or_else(|e| e.into_inner()).closed.is_some() {
            break;
        }
        if !disc {
            let entry = Entry {
                request: p.request,
                data: BytesMut::new(),
                covered: 0,
                chunks: std::collections::BTreeMap::new(),
                reply: p.reply,
                error: None,
            };
            let mut m = inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(gone) = m.closed {
                // Nobody reads replies any more: fail it now, not at the request timeout, and
                // send nothing more on a connection whose state is unknown.
                // Queued requests get the same answer (leaving the loop would answer them Closed).
                let _ = entry.reply.send(Err(InFlight::closed_error(gone)));
                continue;
            }
            m.map.insert(p.request.cookie, entry);
        }
        let sent = async {
            w.write_all(&buf).await?;
            if !p.payload.is_empty() {
                w.write_all(&p.payload).await?;
            }
            w.flush().await
        };
        match sent.await {
            // Later requests are answered by the check above (never Closed by a dropped channel).
            Err(e) => fail_all(&inflight, gone_for_sure(&e)),
            Ok(()) if disc => break,
            Ok(()) => {}
        }
    }
    fail_all(&inflight, true);
}

async fn receive_loop<R: AsyncRead + Unpin>(mut r: R, mut buf: BytesMut, inflight: Arc<Mutex<InFlight>>) {
    let mut decoder = ReplyDecoder::new(64 << 20);
    loop {
        let event = {
            let map = inflight.clone();
            let read_len = move |cookie: u64| {
                let m = map.lock().unwrap_or_else(|e| e.into_inner());
                m.map.get(&cookie).filter(|e| e.request.command == Command::Read).map(|e| e.request.length)
            };
            decoder.decode(&mut buf, &read_len)
        };
        match event {
            Ok(ev) => complete(&inflight, ev),
            Err(proto::DecodeError::Incomplete) => match r.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                Ok(_) => break fail_all(&inflight, true),
                Err(e) => break fail_all(&inflight, gone_for_sure(&e)),
            },
            Err(e) => {
                tracing::error!(error = %e, "NBD client: bad reply stream");
                break fail_all(&inflight, false);
            }
        }
    }
}

fn complete(inflight: &Mutex<InFlight>, ev: ReplyEvent) {
    let mut m = inflight.lock().unwrap_or_else(|e| e.into_inner());
    let cookie = ev.cookie();
    let done = ev.is_done();
    let Some(entry) = m.map.get_mut(&cookie) else { return };
    let offset = entry.request.offset;
    match ev {
        ReplyEvent::Simple { errno: 0, data, .. } => place(entry, offset, data.len() as u64, Some(&data)),
        ReplyEvent::Simple { errno, .. } => entry.error = Some(server_error(errno, offset, String::new())),
        ReplyEvent::Data { offset, data, .. } => place(entry, offset, data.len() as u64, Some(&data)),
        ReplyEvent::Hole { offset, length, .. } => place(entry, offset, u64::from(length), None),
        ReplyEvent::Error { errno, message, .. } => entry.error = Some(server_error(errno, offset, message)),
        ReplyEvent::BlockStatus { .. } | ReplyEvent::None { .. } => {}
    }
    if done {
        if let Some(e) = m.map.remove(&cookie) {
            let short = e.request.command == Command::Read && e.covered != u64::from(e.request.length);
            let result = match e.error {
                Some(err) => Err(err),
                None if short => {
                    Err(NbdClientError::Protocol(proto::DecodeError::Invalid("read reply does not cover the request")))
                }
                None => Ok(e.data.freeze()),
            };
            let _ = e.reply.send(result);
        }
    }
}

/// Puts a READ chunk (`data`, or zeroes for a hole) in place, after checking
/// it lies inside the request: a hostile server's lengths never size a buffer.
fn place(entry: &mut Entry, offset: u64, length: u64, data: Option<&[u8]>) {
    let len = u64::from(entry.request.length);
    let range = offset
        .checked_sub(entry.request.offset)
        .and_then(|at| Some((at, at.checked_add(length)?)))
        .filter(|&(_, end)| end <= len)
        .and_then(|(at, end)| Some(usize::try_from(at).ok()?..usize::try_from(end).ok()?));
    let Some(range) = range else {
        entry.error = Some(NbdClientError::Protocol(proto::DecodeError::Invalid("chunk outside the request")));
        return;
    };
    let before = entry.chunks.range(..range.end).next_back();
    if !range.is_empty() && before.is_some_and(|(_, &end)| end > range.start) {
        entry.error = Some(NbdClientError::Protocol(proto::DecodeError::Invalid("overlapping read chunks")));
        return;
    }
    if !range.is_empty() {
        entry.chunks.insert(range.start, range.end);
    }
    let len = usize::try_from(len).unwrap_or(0);
    if entry.data.len() < len {
        entry.data.resize(len, 0);
    }
    match data {
        Some(d) => entry.data[range].copy_from_slice(d),
        None => entry.data[range].fill(0),
    }
    entry.covered += length;
}

fn server_error(errno: u32, offset: u64, message: String) -> NbdClientError {
    NbdClientError::Server { errno, offset, message }
}

/// Whether a socket error means the connection is gone (reset, or ended
/// without TLS's close message: a peer that died), not merely in an
/// unknown state.
fn gone_for_sure(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

fn fail_all(inflight: &Mutex<InFlight>, gone: bool) {
    let mut m = inflight.lock().unwrap_or_else(|e| e.into_inner());
    let gone = m.closed.unwrap_or(true) && gone;
    m.closed = Some(gone);
    for (_, entry) in m.map.drain() {
        let _ = entry.reply.send(Err(InFlight::closed_error(gone)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client on one end of an in-memory pipe; the test plays a hostile server on the other.
    fn client_with_server() -> (NbdClient, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(near);
        let info = ClientNegotiated { size: 1 << 30, flags: 0, structured_replies: true, block_sizes: None };
        let uri: NbdUri = "nbd+unix:///x?socket=/nonexistent".parse().unwrap();
        (NbdClient::start(&uri, Box::new(r), Box::new(w), BytesMut::new(), info), far)
    }

    /// Reads the client's next request (a READ has no payload).
    async fn next_request(server: &mut tokio::io::DuplexStream) -> Request {
        let mut buf = BytesMut::new();
        let mut decoder = proto::RequestDecoder::new(64 << 20);
        loop {
            if let Ok(proto::Decoded::Request(req, _)) = decoder.decode(&mut buf) {
                return req;
            }
            assert!(server.read_buf(&mut buf).await.unwrap() > 0, "client closed");
        }
    }

    /// The client's tasks run on this (current-thread) runtime's one thread, so the largest
    /// allocation of this thread covers the client's reply handling.
    #[tokio::test]
    async fn a_hole_chunk_longer_than_the_read_is_an_error_not_an_allocation() {
        let (client, mut server) = client_with_server();
        let read = tokio::spawn(async move { client.read(4096, 4096).await });
        let req = next_request(&mut server).await;
        let mut out = BytesMut::new();
        proto::reply::offset_hole(&mut out, req.cookie, true, 4096, u32::MAX);
        crate::testkit::reset_largest_allocation();
        server.write_all(&out).await.unwrap();
        let got = read.await.unwrap();
        assert!(matches!(got, Err(NbdClientError::Protocol(_))), "{got:?}");
        let largest = crate::testkit::largest_allocation();
        assert!(largest < 1 << 20, "a hole's length sized a {largest}-byte allocation");
    }

    #[tokio::test]
    async fn overlapping_read_chunks_that_add_up_to_the_length_are_an_error() {
        let (client, mut server) = client_with_server();
        let read = tokio::spawn(async move { client.read(0, 8192).await });
        let req = next_request(&mut server).await;
        let mut out = BytesMut::new();
        for done in [false, true] {
            proto::reply::offset_data(&mut out, req.cookie, done, 0, 4096);
            out.extend_from_slice(&[7; 4096]);
        }
        server.write_all(&out).await.unwrap();
        let got = read.await.unwrap();
        assert!(matches!(got, Err(NbdClientError::Protocol(_))), "overlapping chunks were taken: {got:?}");
    }

    #[tokio::test]
    async fn a_structured_read_reply_that_covers_part_of_the_request_is_an_error() {
        let (client, mut server) = client_with_server();
        let read = tokio::spawn(async move { client.read(0, 8192).await });
        let req = next_request(&mut server).await;
        let mut out = BytesMut::new();
        proto::reply::offset_data(&mut out, req.cookie, true, 0, 4096);
        out.extend_from_slice(&[7; 4096]);
        server.write_all(&out).await.unwrap();
        let got = read.await.unwrap();
        assert!(matches!(got, Err(NbdClientError::Protocol(_))), "a short read reply was taken: {got:?}");
    }
}
