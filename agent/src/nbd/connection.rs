//! One NBD connection: negotiation, then the transmission loop.
//!
//! The connection task is the only reader. Validated requests run on the
//! store's asynchronous path, inline, or on the blocking pool; their encoded
//! replies go through a channel to a writer task, so replies leave in
//! completion order. A per-connection byte budget (a semaphore in 4 KiB
//! units, charged a request's payload or its largest reply) bounds what can
//! be in flight.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::consts::rep;
use proto::{Command, Decoded, ExportCatalog, ExportInfo, HandshakeConfig, Negotiated, Request, RequestDecoder, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::session::Session;
use crate::export::{ConnectionSlot, Export, Exports};

/// Budget unit: one permit per 4 KiB of request payload or reply data.
const UNIT: u64 = 4096;
/// In-flight budget per connection, in units (64 MiB).
const BUDGET_UNITS: u32 = 16384;

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket IO failed.
    #[error("Connection IO failed")]
    Io(#[from] std::io::Error),
    /// Negotiation failed.
    #[error("Negotiation failed")]
    Handshake(#[from] proto::handshake::HandshakeError),
    /// The client sent bytes that are not a request.
    #[error("Malformed request stream: {0}")]
    Protocol(proto::DecodeError),
    /// The client did not finish negotiation in time.
    #[error("Negotiation timed out")]
    HandshakeTimeout,
    /// The client closed the connection during negotiation.
    #[error("Client closed the connection during negotiation")]
    ClosedInHandshake,
    /// The client asked for TLS, which this listener cannot do.
    #[error("TLS is not available")]
    TlsUnavailable,
    /// The TLS handshake failed.
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    /// The export disappeared between negotiation and transmission.
    #[error("Export {0} was removed")]
    ExportGone(String),
}

/// Shared settings and state every connection needs.
#[derive(Debug)]
pub struct ConnContext {
    /// The export registry.
    pub exports: Arc<Exports>,
    /// Negotiation settings.
    pub handshake: HandshakeConfig,
    /// Time allowed for negotiation.
    pub handshake_timeout: Duration,
    /// Metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// TLS setup of the listener.
    pub tls: Arc<super::tls::Tls>,
    /// Most connections to one export.
    pub max_per_export: usize,
    /// Close a connection idle this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Longest a request on an incoming export waits for the cut-over (then EIO).
    pub incoming_timeout: Duration,
}

/// Who is on the other end of a connection (for the VMs' `allow` lists),
/// and the export slot it took.
#[derive(Debug, Default)]
pub struct Peer {
    /// TCP source address; None on a Unix socket.
    pub ip: Option<IpAddr>,
    /// Subject CN of the client certificate rustls verified, if any.
    pub cn: Option<String>,
    /// Taken when the client enters transmission (GO / EXPORT_NAME).
    slot: Mutex<Option<ConnectionSlot>>,
}

impl Peer {
    /// A new peer; `cn` is set after a TLS handshake.
    pub fn new(ip: Option<IpAddr>) -> Self {
        Self { ip, cn: None, slot: Mutex::default() }
    }

    fn sees(&self, export: &Export) -> bool {
        export.allows(self.ip, self.cn.as_deref())
    }
}

/// The exports as one client may see them: those its VM's `allow` list
/// admits (others are unknown to it, in LIST too).
struct Catalog<'a> {
    exports: &'a Exports,
    peer: &'a Peer,
    max_per_export: usize,
}

impl Catalog<'_> {
    /// The export a name reaches for this client: its VM's `allow` list
    /// decides, except for a migration writer, whose token is its credential.
    fn visible(&self, name: &str) -> Option<Arc<Export>> {
        let token = name.starts_with(crate::export::MIGRATION_PREFIX);
        self.exports.resolve(name).filter(|e| token || self.peer.sees(e))
    }
}

impl ExportCatalog for Catalog<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.visible(name).map(|e| {
            let mut info = e.info();
            info.name = name.to_owned();
            info
        })
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports.list().iter().filter(|e| e.incoming().is_none() && self.peer.sees(e)).map(|e| e.info()).collect()
    }

    fn meta_contexts(&self, export: &str) -> Vec<String> {
        self.visible(export).map(|e| e.meta_contexts()).unwrap_or_default()
    }

    fn admit(&self, name: &str) -> Result<(), (u32, String)> {
        let export = self.visible(name).ok_or_else(|| (rep::ERR_UNKNOWN, format!("unknown export {name:?}")))?;
        let slot = export.try_connect(self.max_per_export).ok_or_else(|| {
            tracing::warn!(export = name, limit = self.max_per_export, "export connection limit reached");
            (rep::ERR_POLICY, format!("export {name:?} has its maximum of {} connections", self.max_per_export))
        })?;
        *self.peer.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
        Ok(())
    }
}

/// How a negotiation round ended.
#[derive(Debug)]
pub enum Negotiation {
    /// Transmission begins.
    Done(Box<Negotiated>),
    /// Upgrade the socket to TLS, then negotiate again.
    StartTls,
    /// The client aborted.
    Aborted,
}

/// Runs negotiation on `stream` (sending the greeting first if `greet`).
pub async fn negotiate<S>(
    stream: &mut S,
    hs: &mut proto::ServerHandshake,
    ctx: &ConnContext,
    peer: &Peer,
    buf: &mut BytesMut,
    greet: bool,
) -> Result<Negotiation, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(256);
    if greet {
        hs.greeting(&mut out);
    }
    loop {
        let catalog = Catalog { exports: &ctx.exports, peer, max_per_export: ctx.max_per_export };
        let step = hs.handle(buf, &catalog, &mut out);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        match step? {
            Step::NeedMore => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(ConnError::ClosedInHandshake);
                }
            }
            Step::Done(negotiated) => return Ok(Negotiation::Done(negotiated)),
            Step::Aborted => return Ok(Negotiation::Aborted),
            Step::StartTls => return Ok(Negotiation::StartTls),
        }
    }
}

/// Serves requests until the client disconnects, the export is removed, or
/// `shutdown` fires; then drains in-flight requests and flushes.
pub async fn transmit<R, W>(
    mut reader: R,
    writer: W,
    mut buf: BytesMut,
    negotiated: Negotiated,
    ctx: &ConnContext,
    peer: &Peer,
    shutdown: CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let name = negotiated.export.name.clone();
    // The slot admission took; held until the connection ends.
    let _slot = peer.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let export = ctx.exports.resolve(&name).ok_or_else(|| ConnError::ExportGone(name.clone()))?;
    let metrics = ctx.metrics.nbd(export.name());
    let session = Arc::new(Session::new(export, &negotiated, ctx.handshake.block_sizes, metrics));
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(writer, rx));
    let stop = CancellationToken::new();
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    // A client that opened an incoming export by its own name (the destination's QEMU):
    // its requests wait for the cut-over.
    let held = (!name.starts_with(crate::export::MIGRATION_PREFIX) && session.export().incoming().is_some())
        .then_some(ctx.incoming_timeout);
    let mut pipe = Pipeline { session: session.clone(), tx, budget, stop: stop.clone(), held };
    let watch = {
        let (stop, shutdown, detached) = (stop.clone(), shutdown.clone(), session.export().detached().clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => stop.cancel(),
                () = detached.cancelled() => stop.cancel(),
                () = stop.cancelled() => {}
            }
        })
    };
    let mut decoder = RequestDecoder::new(ctx.handshake.block_sizes.maximum);
    let detached = session.export().detached().clone();
    let idle_limit = ctx.idle_timeout.unwrap_or(Duration::MAX);
    let mut idle_until = tokio::time::Instant::now().checked_add(idle_limit);
    let result = loop {
        match pump(&mut decoder, &mut buf, &mut pipe).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        buf.reserve(decoder.wanted().clamp(64 << 10, 33 << 20));
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            () = detached.cancelled() => break Ok(()),
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => break Ok(()),
                Ok(_) => idle_until = tokio::time::Instant::now().checked_add(idle_limit),
                Err(e) => break Err(e.into()),
            },
            () = sleep_until(idle_until) => {
                if pipe.budget.available_permits() == BUDGET_UNITS as usize {
                    tracing::info!(export = %name, idle_secs = idle_limit.as_secs(), "closing idle connection");
                    break Ok(());
                }
                idle_until = tokio::time::Instant::now().checked_add(idle_limit);
            }
        }
    };
    pipe.drain().await;
    if shutdown.is_cancelled() && !session.export().read_only() {
        let store = session.export().store().clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
    drop(pipe);
    stop.cancel();
    let _ = watch.await;
    let aborter = writer.abort_handle();
    if tokio::time::timeout(DRAIN_LIMIT, writer).await.is_err() {
        aborter.abort();
    }
    result
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Decodes and dispatches every complete request in `buf`; false after DISC.
async fn pump(decoder: &mut RequestDecoder, buf: &mut BytesMut, pipe: &mut Pipeline) -> Result<bool, ConnError> {
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::Request(req, _)) if req.command == Command::Disc => return Ok(false),
            Ok(Decoded::Request(req, payload)) => pipe.dispatch(req, payload).await,
            Ok(Decoded::Oversized(req)) => {
                let reply = pipe.session.error_reply(&req, proto::consts::errno::EOVERFLOW, "write too large");
                pipe.send_small(reply).await;
            }
            Err(proto::DecodeError::Incomplete) => return Ok(true),
            Err(e) => return Err(ConnError::Protocol(e)),
        }
    }
}

/// A reply with the budget it holds until it has been written to the socket,
/// so a client that stops reading stops the server from reading more.
type Outgoing = (Vec<u8>, Option<OwnedSemaphorePermit>);

struct Pipeline {
    session: Arc<Session>,
    tx: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Semaphore>,
    /// Cancelled on shutdown or export removal: a reader waiting for budget stops waiting.
    stop: CancellationToken,
    /// Set while requests wait for an incoming export's cut-over (at most this long each).
    held: Option<Duration>,
}

impl Pipeline {
    async fn dispatch(&mut self, req: Request, payload: Bytes) {
        if let Some(limit) = self.held {
            let export = self.session.export().clone();
            let write = !matches!(req.command, Command::Read | Command::BlockStatus | Command::Cache);
            let admitted = tokio::select! {
                ok = export.admit(write, limit) => ok,
                () = self.stop.cancelled() => return,
            };
            if !admitted {
                tracing::warn!(export = %export.name(), command = ?req.command, secs = limit.as_secs(), "IO on an incoming export timed out waiting for the cut-over");
                let reply =
                    self.session.error_reply(&req, proto::consts::errno::EIO, "the migration did not cut over in time");
                self.send_small(reply).await;
                return;
            }
            if export.is_live() {
                self.held = None;
            }
        }
        if let Err(rejection) = self.session.validate(&req) {
            self.session.rejected(&req);
            let reply = self.session.error_reply(&req, rejection.errno, rejection.message);
            self.send_small(reply).await;
            return;
        }
        let units = 1 + self.session.in_flight_bytes(&req) / UNIT;
        let units = u32::try_from(units).unwrap_or(BUDGET_UNITS).min(BUDGET_UNITS);
        let permit = tokio::select! {
            p = self.budget.clone().acquire_many_owned(units) => p,
            () = self.stop.cancelled() => return,
        };
        let Ok(permit) = permit else { return };
        if let Some(reply) = self.session.start_async(&req, &payload) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send((reply.await, Some(permit)));
            });
            return;
        }
        if let Some(reply) = self.session.try_inline(&req, &payload) {
            let _ = self.tx.send((reply, Some(permit)));
            return;
        }
        let (session, tx) = (self.session.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let reply = session.execute(&req, &payload);
            let _ = tx.send((reply, Some(permit)));
        });
    }

    /// Queues an error reply, charged one budget unit like any request.
    async fn send_small(&self, reply: Vec<u8>) {
        let permit = tokio::select! {
            p = self.budget.clone().acquire_owned() => p.ok(),
            () = self.stop.cancelled() => return,
        };
        let _ = self.tx.send((reply, permit));
    }

    /// Waits until every reply was written (bounded: a client that stopped
    /// reading does not hold a shutdown forever).
    async fn drain(&self) {
        let _ = tokio::time::timeout(DRAIN_LIMIT, self.budget.acquire_many(BUDGET_UNITS)).await;
    }
}

/// Longest a closing connection waits for its replies to be written.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(64 << 10, writer);
    let mut written = Vec::new();
    while let Some((reply, permit)) = rx.recv().await {
        out.write_all(&reply).await?;
        written.push(permit);
        while let Ok((reply, permit)) = rx.try_recv() {
            out.write_all(&reply).await?;
            written.push(permit);
        }
        out.flush().await?;
        written.clear();
    }
    out.shutdown().await
}
