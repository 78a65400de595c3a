//! A negotiated session: request validation and execution against an export.
//!
//! [`Session::execute`] is synchronous: it runs on the blocking pool (or
//! inline, for page-cache files) and returns the encoded reply. Stores with
//! an asynchronous data path run reads, flushes and plain writes through
//! [`Session::start_async`] instead, with no thread parked per request.

use std::sync::Arc;

use bytes::Bytes;
use proto::consts::{cmd_flags, errno, state, BASE_ALLOCATION, QEMU_DIRTY_BITMAP_PREFIX};
use proto::handshake::BlockSizes;
use proto::reply::{self, Extent as WireExtent, OFFSET_DATA_HEADER_LEN, SIMPLE_REPLY_LEN};
use proto::{Command, Negotiated, Request};

use crate::export::{Export, ExportError};
use crate::metrics::NbdMetrics;
use crate::store::{ExtentKind, StoreError};

/// A request running on the store's asynchronous data path; yields the encoded reply.
pub(crate) type AsyncReply = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>>;

/// Most extents returned in one BLOCK_STATUS chunk.
const MAX_EXTENTS: usize = 1 << 16;

/// What a selected metadata context reports.
#[derive(Debug, Clone)]
enum Context {
    Allocation,
    DirtyBitmap(String),
}

/// A request that failed validation, with the error to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub errno: u32,
    pub message: &'static str,
}

const fn reject(errno: u32, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// The state of one connection after negotiation.
#[derive(Debug)]
pub(crate) struct Session {
    export: Arc<Export>,
    structured: bool,
    contexts: Vec<(u32, Context)>,
    alignment: u64,
    max_payload: u32,
    metrics: NbdMetrics,
}

impl Session {
    pub fn new(export: Arc<Export>, negotiated: &Negotiated, sizes: BlockSizes, metrics: NbdMetrics) -> Self {
        let contexts = negotiated
            .meta_contexts
            .iter()
            .filter_map(|c| {
                let context = match c.name.strip_prefix(QEMU_DIRTY_BITMAP_PREFIX) {
                    Some(bitmap) => Context::DirtyBitmap(bitmap.to_owned()),
                    None if c.name == BASE_ALLOCATION => Context::Allocation,
                    None => return None,
                };
                Some((c.id, context))
            })
            .collect();
        let alignment = if negotiated.block_sizes_negotiated { u64::from(sizes.minimum) } else { 1 };
        Self {
            export,
            structured: negotiated.structured_replies,
            contexts,
            alignment,
            max_payload: sizes.maximum,
            metrics,
        }
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    /// The most bytes `req` can hold in flight: its payload or its reply
    /// (a READ's data; a BLOCK_STATUS reply of up to [`MAX_EXTENTS`]
    /// extents per selected context, 8 bytes each, and never more extents
    /// than bytes asked about).
    pub fn in_flight_bytes(&self, req: &Request) -> u64 {
        match req.command {
            Command::Read | Command::Write => u64::from(req.length),
            Command::BlockStatus => {
                let extents = if req.has_flag(cmd_flags::REQ_ONE) {
                    1
                } else {
                    u64::from(req.length).clamp(1, MAX_EXTENTS as u64)
                };
                self.contexts.len() as u64 * (extents * 8 + 32)
            }
            _ => 0,
        }
    }

    /// Checks a request's meaning: command, flags, range, permissions.
    pub fn validate(&self, req: &Request) -> Result<(), Rejection> {
        let writes = matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes);
        let allowed = match req.command {
            Command::Read => cmd_flags::FUA | if self.structured { cmd_flags::DF } else { 0 },
            Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            Command::BlockStatus => cmd_flags::FUA | cmd_flags::REQ_ONE,
            Command::Unknown(_) => return Err(reject(errno::EINVAL, "unknown command")),
            _ => cmd_flags::FUA,
        };
        if req.flags & !allowed != 0 {
            return Err(reject(errno::EINVAL, "flag not valid for this command"));
        }
        if writes && self.export.read_only() {
            return Err(reject(errno::EPERM, "export is read-only"));
        }
        if matches!(req.command, Command::Read | Command::Write) && req.length > self.max_payload {
            return Err(reject(errno::EOVERFLOW, "request exceeds the maximum payload"));
        }
        if req.command == Command::BlockStatus && self.contexts.is_empty() {
            return Err(reject(errno::EINVAL, "no metadata context negotiated"));
        }
        if req.command == Command::Flush {
            return Ok(());
        }
        if !(req.offset | u64::from(req.length)).is_multiple_of(self.alignment) {
            return Err(reject(errno::EINVAL, "request not aligned to the minimum block size"));
        }
        match req.end() {
            Some(end) if end <= self.export.size() => Ok(()),
            _ if writes => Err(reject(errno::ENOSPC, "request past the end of the export")),
            _ => Err(reject(errno::EINVAL, "request past the end of the export")),
        }
    }

    /// Encodes an error reply for `req`.
    pub fn error_reply(&self, req: &Request, errno: u32, message: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.structured && matches!(req.command, Command::Read | Command::BlockStatus) {
            reply::error(&mut out, req.cookie, true, errno, message);
        } else {
            reply::simple(&mut out, req.cookie, errno);
        }
        out
    }

    /// Runs a validated request, records its metrics, returns the encoded reply.
    pub fn execute(&self, req: &Request, payload: &Bytes) -> Vec<u8> {
        let started = self.metrics.start();
        let reply = self.run(req, payload);
        let bytes = if matches!(req.command, Command::Read | Command::Write) { u64::from(req.length) } else { 0 };
        self.metrics.done(op_index(req.command), bytes, reply_ok(&reply), started);
        reply
    }

    /// `req` on the store's asynchronous data path (librbd aio), already
    /// started: reads, flushes, and writes that need nothing blocking (see
    /// [`Export::try_write_async`]). `None`: run [`execute`](Self::execute)
    /// on the blocking pool instead.
    pub fn start_async(self: &Arc<Self>, req: &Request, payload: &Bytes) -> Option<AsyncReply> {
        let aio = self.export.store().async_io()?;
        let (me, req) = (self.clone(), *req);
        // Every `None` comes before `counted`, which starts the request's metrics.
        match req.command {
            Command::Read => {
                let header = if self.structured { OFFSET_DATA_HEADER_LEN } else { SIMPLE_REPLY_LEN };
                let len = usize::try_from(req.length).ok()?;
                let mut buf = Vec::with_capacity(header + len);
                buf.resize(header, 0);
                let read = aio.read(buf, len, req.offset);
                Some(self.counted(req, async move {
                    match read.await {
                        Ok(out) => me.read_reply(&req, out),
                        Err(e) => me.store_error(&req, &e),
                    }
                }))
            }
            Command::Write => {
                let write = self.export.try_write_async(payload.clone(), req.offset, req.has_flag(cmd_flags::FUA))?;
                Some(self.counted(req, async move { me.status_reply(&req, write.await) }))
            }
            Command::Flush => {
                let flush = aio.flush();
                Some(self.counted(req, async move { me.status_reply(&req, flush.await.map_err(ExportError::from)) }))
            }
            _ => None,
        }
    }

    /// `reply` as an [`AsyncReply`] that records the request's metrics
    /// (counted in flight from now until the reply is ready).
    fn counted(
        self: &Arc<Self>,
        req: Request,
        reply: impl std::future::Future<Output = Vec<u8>> + Send + 'static,
    ) -> AsyncReply {
        let (me, started) = (self.clone(), self.metrics.start());
        Box::pin(async move {
            let reply = reply.await;
            let bytes = if matches!(req.command, Command::Read | Command::Write) { u64::from(req.length) } else { 0 };
            me.metrics.done(op_index(req.command), bytes, reply_ok(&reply), started);
            reply
        })
    }

    /// Runs `req` on the connection's own task if it is a page-cache read
    /// or write of a plain file image, without FUA, and nothing on a
    /// write's way would wait (a cut-over's barrier, a backup's drain,
    /// bitmap bits not yet durable: see [`Export::try_admit`]). `None`: run
    /// [`execute`](Self::execute) on the blocking pool instead. Everything
    /// that can block for long (flush, FUA, layered or remote images, a
    /// mirror's forwarding hook) goes there; a backup's copy-before-write
    /// of a page-cache disk (a page-cache read and a scratch-file write)
    /// stays inline.
    pub fn try_inline(&self, req: &Request, payload: &Bytes) -> Option<Vec<u8>> {
        let inline = matches!(req.command, Command::Read | Command::Write | Command::BlockStatus | Command::Cache)
            && !req.has_flag(cmd_flags::FUA)
            && self.export.store().capabilities().inline_io
            && !self.export.has_blocking_hooks();
        if !inline {
            return None;
        }
        if req.command != Command::Write {
            return Some(self.execute(req, payload));
        }
        let admission = match self.export.try_admit(req.offset, u64::from(req.length)) {
            // Hooks cannot change while the admission holds the bitmaps' write section.
            Ok(Some(_)) if self.export.has_blocking_hooks() => return None,
            Ok(Some(admission)) => Ok(admission),
            Ok(None) => return None,
            Err(e) => Err(e),
        };
        let started = self.metrics.start();
        let result = admission.and_then(|a| self.export.write_admitted(a, payload, req.offset, false));
        let reply = self.status_reply(req, result);
        self.metrics.done(op_index(req.command), u64::from(req.length), reply_ok(&reply), started);
        Some(reply)
    }

    /// Records a request refused before execution.
    pub fn rejected(&self, req: &Request) {
        let started = self.metrics.start();
        self.metrics.done(op_index(req.command), 0, false, started);
    }

    fn run(&self, req: &Request, payload: &Bytes) -> Vec<u8> {
        let fua = req.has_flag(cmd_flags::FUA);
        let (off, len) = (req.offset, u64::from(req.length));
        let result = match req.command {
            Command::Read => return self.read(req),
            Command::BlockStatus => return self.block_status(req),
            Command::Write => self.export.write(payload, off, fua),
            Command::Trim => self.export.discard(off, len, fua),
            Command::WriteZeroes => self.export.write_zeroes(off, len, !req.has_flag(cmd_flags::NO_HOLE), fua),
            Command::Flush => self.export.store().flush().map_err(ExportError::from),
            Command::Cache | Command::Disc | Command::Unknown(_) => Ok(()),
        };
        self.status_reply(req, result)
    }

    fn status_reply(&self, req: &Request, result: Result<(), ExportError>) -> Vec<u8> {
        match result {
            Ok(()) => {
                let mut out = Vec::with_capacity(SIMPLE_REPLY_LEN);
                reply::simple(&mut out, req.cookie, 0);
                out
            }
            Err(e) => self.store_error(req, &e),
        }
    }

    fn store_error(&self, req: &Request, e: &dyn NbdError) -> Vec<u8> {
        tracing::warn!(export = self.export.name(), cookie = req.cookie, error = %e, "request failed");
        self.error_reply(req, e.errno(), &e.to_string())
    }

    fn read(&self, req: &Request) -> Vec<u8> {
        let header = if self.structured { OFFSET_DATA_HEADER_LEN } else { SIMPLE_REPLY_LEN };
        let len = usize::try_from(req.length).unwrap_or(0);
        let mut out = Vec::with_capacity(header + len);
        out.resize(header, 0);
        if let Err(e) = self.export.store().read_append(&mut out, len, req.offset) {
            return self.store_error(req, &e);
        }
        self.read_reply(req, out)
    }

    /// Fills in the reply header of `out`, a read reply whose data is in place.
    fn read_reply(&self, req: &Request, mut out: Vec<u8>) -> Vec<u8> {
        let header = if self.structured { OFFSET_DATA_HEADER_LEN } else { SIMPLE_REPLY_LEN };
        let mut head = &mut out[..header];
        if self.structured {
            reply::offset_data(&mut head, req.cookie, true, req.offset, req.length);
        } else {
            reply::simple(&mut head, req.cookie, 0);
        }
        out
    }

    fn block_status(&self, req: &Request) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let last = self.contexts.len().saturating_sub(1);
        for (i, (id, context)) in self.contexts.iter().enumerate() {
            let extents = match context {
                Context::Allocation => self.allocation(req),
                Context::DirtyBitmap(name) => self.dirty_bitmap(req, name),
            };
            match extents {
                Ok(extents) => reply::block_status(&mut out, req.cookie, i == last, *id, &extents),
                Err(e) => return self.store_error(req, &e),
            }
        }
        out
    }

    fn allocation(&self, req: &Request) -> Result<Vec<WireExtent>, StoreError> {
        let extents = self.export.store().extents(req.offset, u64::from(req.length))?;
        let flags = |kind| if kind == ExtentKind::Hole { state::HOLE | state::ZERO } else { 0 };
        let runs = extents.iter().map(|e| (e.length, flags(e.kind)));
        Ok(to_wire(runs, req.has_flag(cmd_flags::REQ_ONE)))
    }
}

impl Session {
    fn dirty_bitmap(&self, req: &Request, name: &str) -> Result<Vec<WireExtent>, StoreError> {
        let runs = match self.export.bitmaps().get(name) {
            Ok(bitmap) => bitmap.extents(req.offset, u64::from(req.length)),
            // Removed since negotiation: report nothing dirty rather than fail the request.
            Err(_) => vec![(u64::from(req.length), false)],
        };
        let runs = runs.into_iter().map(|(length, dirty)| (length, if dirty { state::DIRTY } else { 0 }));
        Ok(to_wire(runs, req.has_flag(cmd_flags::REQ_ONE)))
    }
}

/// Index into [`crate::metrics::OPS`].
fn op_index(c: Command) -> usize {
    match c {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::Cache => 5,
        Command::BlockStatus => 6,
        _ => 7,
    }
}

/// Whether an encoded reply reports success.
fn reply_ok(reply: &[u8]) -> bool {
    match reply.get(..8) {
        Some(h) if h[..4] == proto::consts::SIMPLE_REPLY_MAGIC.to_be_bytes() => h[4..8] == [0; 4],
        Some(h) => u16::from_be_bytes([h[6], h[7]]) & 0x8000 == 0,
        None => false,
    }
}

/// An error that maps to an NBD error number.
trait NbdError: std::fmt::Display {
    fn errno(&self) -> u32;
}

impl NbdError for StoreError {
    fn errno(&self) -> u32 {
        self.nbd_errno()
    }
}

impl NbdError for ExportError {
    fn errno(&self) -> u32 {
        self.nbd_errno()
    }
}

/// Merges runs of equal flags into wire extents (one if `req_one`).
fn to_wire(runs: impl Iterator<Item = (u64, u32)>, req_one: bool) -> Vec<WireExtent> {
    let mut out: Vec<WireExtent> = Vec::new();
    for (length, flags) in runs {
        let Ok(length) = u32::try_from(length) else { break };
        let full = out.len() >= MAX_EXTENTS || (req_one && !out.is_empty());
        match out.last_mut() {
            Some(prev) if prev.flags == flags => prev.length = prev.length.saturating_add(length),
            _ if full => break,
            _ => out.push(WireExtent { length, flags }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DiskBitmaps;
    use crate::config::BitmapConfig;
    use crate::store::file::FileStore;
    use crate::store::Stores;
    use std::time::{Duration, Instant};

    const SIZE: u64 = 1 << 20;

    /// A session on a `file:` disk with one recording bitmap.
    fn session(dir: &std::path::Path) -> Session {
        let store: Arc<dyn crate::store::BlockStore> =
            Arc::new(FileStore::create(&dir.join("disk.raw"), SIZE, &Stores::new(None)).unwrap());
        let bitmap = BitmapConfig { name: "b".into(), granularity: 65536, enabled: true };
        let bitmaps =
            DiskBitmaps::open(&dir.join("bitmaps"), "vm/disk", SIZE, store.identity().unwrap(), &[bitmap], 0).unwrap();
        let export = Arc::new(Export::new("vm/disk".into(), String::new(), store, Arc::new(bitmaps), false));
        let info = export.info();
        let negotiated =
            Negotiated { export: info, structured_replies: true, meta_contexts: vec![], block_sizes_negotiated: false };
        let sizes = BlockSizes { minimum: 1, preferred: 4096, maximum: 32 << 20 };
        Session::new(export, &negotiated, sizes, crate::metrics::Metrics::new().nbd("vm/disk"))
    }

    fn write(offset: u64) -> Request {
        Request { cookie: 1, command: Command::Write, flags: 0, offset, length: 4096 }
    }

    /// A write on the connection's own task never waits for a drain (a VM
    /// backup's group freeze holds each disk drained until every disk
    /// froze, and writes parked on the runtime's workers would keep the
    /// other disks' jobs from getting there): it goes to the blocking pool
    /// at once instead, and waits there.
    #[test]
    fn an_inline_write_never_waits_for_a_drain() {
        let dir = tempfile::tempdir().unwrap();
        let session = session(dir.path());
        let payload = Bytes::from(vec![7u8; 4096]);
        // A new bit needs a sync: not inline.
        assert!(session.try_inline(&write(0), &payload).is_none());
        assert!(reply_ok(&session.execute(&write(0), &payload)));
        // Durable now: inline.
        assert!(session.try_inline(&write(0), &payload).is_some_and(|r| reply_ok(&r)));
        let export = session.export().clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            export.bitmaps().drained(|_| {
                held_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(Duration::from_secs(5));
            });
        });
        held_rx.recv().unwrap();
        let asked = Instant::now();
        let inline = session.try_inline(&write(0), &payload);
        let waited = asked.elapsed();
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(inline.is_none(), "an inline write ran while the disk was drained");
        assert!(waited < Duration::from_secs(2), "the inline attempt waited {waited:?} for the drain");
        assert!(session.try_inline(&write(0), &payload).is_some_and(|r| reply_ok(&r)));
    }

    #[test]
    fn runs_merge_and_req_one_keeps_the_first() {
        let runs = [(4096, 0), (4096, 0), (8192, 3), (512, 0)];
        assert_eq!(
            to_wire(runs.into_iter(), false),
            vec![
                WireExtent { length: 8192, flags: 0 },
                WireExtent { length: 8192, flags: 3 },
                WireExtent { length: 512, flags: 0 }
            ]
        );
        assert_eq!(to_wire(runs.into_iter(), true), vec![WireExtent { length: 8192, flags: 0 }]);
    }
}
