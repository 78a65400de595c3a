//! Exports: a disk as clients see it, and the registry of all of them.
//!
//! An [`Export`] joins an image store with everything that must happen on
//! its write path (range checks, and marking dirty bitmaps before a write
//! reaches the store). The NBD server and block jobs both go through it, so
//! no write can bypass the tracking.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use proto::consts::{tflags, BASE_ALLOCATION, QEMU_DIRTY_BITMAP_PREFIX};
use proto::ExportInfo;
use tokio_util::sync::CancellationToken;

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::bitmap::{BitmapError, DiskBitmaps, Drained, OwnedShared};
use crate::config::Allow;
use crate::store::{BlockStore, StoreError};

/// Why a request on an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Marking the bitmaps failed; the write was not done.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

impl ExportError {
    /// The NBD error number a client sees.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            Self::Store(e) => e.nbd_errno(),
            Self::Bitmap(_) => proto::consts::errno::EIO,
        }
    }
}

/// One exported disk.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    store: Arc<dyn BlockStore>,
    bitmaps: Arc<DiskBitmaps>,
    hooks: ArcSwap<Vec<Arc<dyn WriteHook>>>,
    read_only: AtomicBool,
    base_read_only: bool,
    barrier: WriteBarrier,
    incoming: Mutex<Option<String>>,
    /// How far the export serves clients that open it by its own name.
    serving: tokio::sync::watch::Sender<Serving>,
    /// Set by the first IO a client sends under the real name while the
    /// export is incoming (the `first-io` cut-over trigger).
    first_io: tokio::sync::watch::Sender<bool>,
    detached: CancellationToken,
    allow: ArcSwap<Vec<Allow>>,
    connections: AtomicUsize,
}

/// One of an export's connection slots, held while a client is connected.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Export>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, SeqCst);
    }
}

impl Export {
    /// Exports `store` as `name` (`VM/DISK`).
    pub fn new(
        name: String,
        description: String,
        store: Arc<dyn BlockStore>,
        bitmaps: Arc<DiskBitmaps>,
        read_only: bool,
    ) -> Self {
        let read_only = read_only || store.capabilities().read_only;
        Self {
            name,
            description,
            store,
            bitmaps,
            hooks: ArcSwap::default(),
            read_only: AtomicBool::new(read_only),
            base_read_only: read_only,
            barrier: WriteBarrier::default(),
            incoming: Mutex::new(None),
            serving: tokio::sync::watch::Sender::new(Serving::Live),
            first_io: tokio::sync::watch::Sender::new(false),
            detached: CancellationToken::new(),
            allow: ArcSwap::default(),
            connections: AtomicUsize::new(0),
        }
    }

    /// Sets who may list and open the export (the VM's `allow`; empty:
    /// everyone). Clients already connected stay.
    pub fn set_allow(&self, allow: Vec<Allow>) {
        self.allow.store(Arc::new(allow));
    }

    /// Whether a client may see and open the export: `ip` None on a Unix
    /// socket, `cn` the subject CN of its verified TLS certificate.
    pub fn allows(&self, ip: Option<IpAddr>, cn: Option<&str>) -> bool {
        let allow = self.allow.load();
        allow.is_empty() || allow.iter().any(|a| a.matches(ip, cn))
    }

    /// Takes a connection slot if fewer than `limit` are taken.
    pub fn try_connect(self: &Arc<Self>, limit: usize) -> Option<ConnectionSlot> {
        self.connections.fetch_update(SeqCst, SeqCst, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(ConnectionSlot(self.clone()))
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }

    /// Installs a write hook; call inside [`DiskBitmaps::drained`] so no
    /// write is half-way through when it starts seeing writes.
    pub fn add_hook(&self, _: &Drained, hook: Arc<dyn WriteHook>) {
        self.hooks.rcu(|hooks| {
            let mut v = hooks.as_ref().clone();
            v.push(hook.clone());
            v
        });
    }

    /// Removes a write hook.
    pub fn remove_hook<H: WriteHook + 'static>(&self, hook: &Arc<H>) {
        let target = Arc::as_ptr(hook).cast::<()>();
        self.hooks
            .rcu(|hooks| hooks.iter().filter(|h| Arc::as_ptr(h).cast::<()>() != target).cloned().collect::<Vec<_>>());
    }

    /// Whether a job hook on the write path may block on slow IO (network,
    /// Ceph); writes must then leave the connection's task.
    pub fn has_blocking_hooks(&self) -> bool {
        self.hooks.load().iter().any(|h| !h.inline_safe())
    }

    /// Holds new writes and waits for in-flight ones (cut-over); writes
    /// resume when the guard drops.
    ///
    /// The wait runs on a thread of its own, not the blocking pool: writes
    /// held by another disk's closed barrier may fill the pool (a VM's
    /// disks cut over together).
    pub async fn quiesce(self: &Arc<Self>) -> QuiesceGuard {
        let me = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("rbdsync-quiesce".into()).spawn(move || {
            me.barrier.close();
            let _ = tx.send(());
        });
        match spawned {
            Ok(_) => {
                let _ = rx.await;
            }
            // No thread to spare: close from here (this worker blocks until writes drained).
            Err(_) => crate::rt::blocking(|| self.barrier.close()),
        }
        QuiesceGuard(self.clone())
    }

    /// Makes the export an incoming migration target: the source's mirror
    /// writes through `migration/TOKEN/VM/DISK`; clients that open it by its
    /// own name (the destination's QEMU) connect, but their IO waits (reads
    /// until [`set_synced`](Self::set_synced), the rest until
    /// [`activate`](Self::activate)).
    pub fn set_incoming(&self, token: &str) {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.to_owned());
        self.serving.send_replace(Serving::Hidden);
    }

    /// The source reports the export in sync (every write acknowledged
    /// there is here, and stays so): reads by its own name are served.
    pub fn set_synced(&self) {
        self.serving.send_if_modified(|s| {
            let hidden = *s == Serving::Hidden;
            if hidden {
                *s = Serving::Synced;
            }
            hidden
        });
    }

    /// Withdraws [`set_synced`](Self::set_synced): reads by the export's own
    /// name wait again (a restarted source mirrors again).
    pub fn set_unsynced(&self) {
        self.serving.send_if_modified(|s| {
            let synced = *s == Serving::Synced;
            if synced {
                *s = Serving::Hidden;
            }
            synced
        });
    }

    /// Ends the incoming state: the export is served under its own name,
    /// and IO held until now runs.
    pub fn activate(&self) {
        *self.incoming.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.serving.send_replace(Serving::Live);
    }

    /// Waits (at most `limit`) until a request by the export's own name may
    /// run: a read once the export is in sync, anything else once it is
    /// live (the first such request while incoming raises
    /// [`first_io`](Self::first_io): the resumed VM wants to write). False:
    /// still not allowed.
    pub async fn admit(&self, write: bool, limit: std::time::Duration) -> bool {
        let mut serving = self.serving.subscribe();
        let enough = |s: &Serving| *s == Serving::Live || (!write && *s == Serving::Synced);
        if enough(&serving.borrow_and_update()) {
            return true;
        }
        if write && !self.first_io.send_replace(true) {
            tracing::info!(disk = %self.name, "first write on an incoming export: held until the cut-over");
        }
        let woken = tokio::time::timeout(limit, serving.wait_for(enough)).await;
        matches!(woken, Ok(Ok(_)))
    }

    /// Whether the export is live (not an incoming migration target).
    pub fn is_live(&self) -> bool {
        *self.serving.borrow() == Serving::Live
    }

    /// Whether a client sent IO by the export's own name while it was incoming.
    pub fn first_io(&self) -> tokio::sync::watch::Receiver<bool> {
        self.first_io.subscribe()
    }

    /// The migration token while the export is an incoming target.
    pub fn incoming(&self) -> Option<String> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes the export refuse writes from now on (after a cut-over).
    pub fn set_read_only(&self) {
        self.read_only.store(true, SeqCst);
    }

    /// Undoes [`set_read_only`](Self::set_read_only) unless the disk is read-only by configuration.
    pub fn set_writable(&self) {
        self.read_only.store(self.base_read_only, SeqCst);
    }

    /// The disk's dirty bitmaps.
    pub fn bitmaps(&self) -> &Arc<DiskBitmaps> {
        &self.bitmaps
    }

    /// Export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only.load(SeqCst)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// Cancelled when the export is removed; its connections then close.
    pub fn detached(&self) -> &CancellationToken {
        &self.detached
    }

    /// What negotiation advertises: flags derived from the store's capabilities.
    pub fn info(&self) -> ExportInfo {
        let caps = self.store.capabilities();
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_DF;
        flags |= tflags::SEND_CACHE | tflags::CAN_MULTI_CONN;
        if self.read_only() {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
            if caps.discard {
                flags |= tflags::SEND_TRIM;
            }
        }
        ExportInfo { name: self.name.clone(), description: self.description.clone(), size: self.size(), flags }
    }

    /// Metadata contexts this export offers.
    pub fn meta_contexts(&self) -> Vec<String> {
        let bitmaps = self.bitmaps.list().into_iter().filter(|b| b.consistent);
        std::iter::once(BASE_ALLOCATION.to_owned())
            .chain(bitmaps.map(|b| format!("{QEMU_DIRTY_BITMAP_PREFIX}{}", b.name)))
            .collect()
    }

    /// Checks that `offset..offset+length` lies inside the export.
    pub fn check_range(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, length, size }),
        }
    }

    /// Writes through the tracking path: bitmaps are marked (durably)
    /// before the data reaches the store.
    pub fn write(self: &Arc<Self>, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        let admission = self.admit_waiting(offset, data.len() as u64)?;
        self.write_admitted(admission, data, offset, fua)
    }

    /// Zeroes a range through the tracking path.
    pub fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        length: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        let admission = self.admit_waiting(offset, length)?;
        self.run_admitted(admission, offset, WriteData::Zeroes(length), fua, || {
            self.store.write_zeroes(offset, length, may_unmap)
        })
    }

    /// Discards a range through the tracking path.
    pub fn discard(self: &Arc<Self>, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        let admission = self.admit_waiting(offset, length)?;
        self.run_admitted(admission, offset, WriteData::Zeroes(length), fua, || self.store.discard(offset, length))
    }

    /// A write's way in without waiting: `Ok(None)` when a step would wait
    /// (a held barrier, a bitmap hand-off or drain, bits not yet durable);
    /// the caller then takes the blocking path ([`write`](Self::write) on
    /// the blocking pool). An error (read-only) is final on either path.
    pub fn try_admit(self: &Arc<Self>, offset: u64, length: u64) -> Result<Option<Admission>, ExportError> {
        match self.enter_write(offset, length, Wait::GiveUp) {
            Ok(admission) => Ok(Some(admission)),
            Err(Refused::WouldWait) => Ok(None),
            Err(Refused::Error(e)) => Err(e),
        }
    }

    /// [`enter_write`](Self::enter_write), waiting at each step.
    fn admit_waiting(self: &Arc<Self>, offset: u64, length: u64) -> Result<Admission, ExportError> {
        match self.enter_write(offset, length, Wait::Block) {
            Ok(admission) => Ok(admission),
            Err(Refused::Error(e)) => Err(e),
            Err(Refused::WouldWait) => unreachable!("an admission that waits never gives up"),
        }
    }

    /// The one way in for every write: barrier → read-only check → the
    /// bitmaps' write section → mark. Each step runs once; with
    /// [`Wait::GiveUp`] a step that would wait ends the admission instead.
    fn enter_write(self: &Arc<Self>, offset: u64, length: u64, wait: Wait) -> Result<Admission, Refused> {
        let block = wait == Wait::Block;
        if block {
            self.barrier.enter();
        } else if !self.barrier.try_enter() {
            return Err(Refused::WouldWait);
        }
        let entered = OwnedEntered(self.clone());
        // After entering: a cut-over sets read-only while the barrier is closed.
        self.writable().map_err(|e| Refused::Error(e.into()))?;
        let section = if block {
            self.bitmaps.write_section()
        } else {
            self.bitmaps.try_write_section().ok_or(Refused::WouldWait)?
        };
        if block {
            self.bitmaps.mark(offset, length).map_err(|e| Refused::Error(e.into()))?;
        } else if !self.bitmaps.try_mark(offset, length).map_err(|e| Refused::Error(e.into()))? {
            // The bits are set in memory; the blocking path's mark syncs them.
            return Err(Refused::WouldWait);
        }
        Ok(Admission { _section: section, _entered: entered })
    }

    /// Writes `data` once admitted: hooks, store, FUA.
    pub fn write_admitted(&self, admission: Admission, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        self.run_admitted(admission, offset, WriteData::Data(data), fua, || self.store.write_at(data, offset))
    }

    /// The store IO of an admitted write between the hooks: before-hooks
    /// (copy-before-write, mirror tracking) → store → after-hooks (active
    /// mirror) → FUA. The admission ends (barrier and write section left)
    /// when this returns.
    fn run_admitted(
        &self,
        _admission: Admission,
        offset: u64,
        data: WriteData<'_>,
        fua: bool,
        io: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), ExportError> {
        let length = data.len();
        // Hooks are installed only under the exclusive gate (`drained`): none can appear or go
        // while the admission holds the write section.
        let hooks = self.hooks.load();
        for hook in hooks.iter() {
            hook.before_write(offset, length)?;
        }
        if let Err(e) = io() {
            for hook in hooks.iter() {
                hook.write_failed(offset, length);
            }
            return Err(e.into());
        }
        for hook in hooks.iter() {
            hook.after_write(offset, &data)?;
        }
        Ok(self.fua(fua)?)
    }

    /// A write on the store's asynchronous data path (librbd aio): `None`
    /// when the admission would wait or a job's hook is installed; the
    /// caller then takes [`write`](Self::write). The future holds the
    /// admission until the store completed the write, as the blocking path
    /// does.
    pub fn try_write_async(
        self: &Arc<Self>,
        data: Bytes,
        offset: u64,
        fua: bool,
    ) -> Option<impl std::future::Future<Output = Result<(), ExportError>> + Send + 'static> {
        let aio = self.store.async_io()?;
        let admission = self.try_admit(offset, data.len() as u64).ok()??;
        if !self.hooks.load().is_empty() {
            return None;
        }
        let write = aio.write(data, offset);
        // FUA: a flush submitted after the write completed (not alongside it), so it covers the
        // write whatever cache librbd runs with (pool or image settings can turn one back on).
        let flush_after = fua.then(|| self.store.clone());
        Some(async move {
            let result = write.await;
            drop(admission);
            result?;
            if let Some(aio) = flush_after.as_ref().and_then(|store| store.async_io()) {
                aio.flush().await?;
            }
            Ok(())
        })
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.read_only() {
            return Err(StoreError::ReadOnly);
        }
        Ok(())
    }

    fn fua(&self, fua: bool) -> Result<(), StoreError> {
        if fua {
            self.store.flush()?;
        }
        Ok(())
    }
}

/// How far an export serves clients that open it by its own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serving {
    /// An incoming migration target not yet in sync: every request waits.
    Hidden,
    /// In sync with the source: reads run, everything else waits.
    Synced,
    /// Served.
    Live,
}

/// Compares secrets without leaking where they differ through timing
/// (`subtle`; only a length difference shows).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// What a write carries, for hooks that need the data.
#[derive(Debug, Clone, Copy)]
pub enum WriteData<'a> {
    /// A WRITE's payload.
    Data(&'a [u8]),
    /// WRITE_ZEROES or TRIM of this many bytes.
    Zeroes(u64),
}

impl WriteData<'_> {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        match self {
            WriteData::Data(d) => d.len() as u64,
            WriteData::Zeroes(n) => *n,
        }
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Something that must see every write of an export (jobs install these).
pub trait WriteHook: Send + Sync + std::fmt::Debug {
    /// Before the write reaches the store (the old data is still there).
    fn before_write(&self, _offset: u64, _length: u64) -> Result<(), StoreError> {
        Ok(())
    }
    /// After the write reached the store, before it is acknowledged.
    fn after_write(&self, _offset: u64, _data: &WriteData<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    /// The store write failed (the range may be partly written).
    fn write_failed(&self, _offset: u64, _length: u64) {}
    /// Whether the hooks do only page-cache-speed work and short waits, so
    /// a page-cache write may stay on the NBD connection's task instead of
    /// going to the blocking pool.
    fn inline_safe(&self) -> bool {
        false
    }
}

/// Lets a cut-over hold new writes and wait for in-flight ones.
#[derive(Debug, Default)]
struct WriteBarrier {
    state: Mutex<(bool, u64)>,
    changed: Condvar,
}

impl WriteBarrier {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, u64)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a write (waits while closed); leave with [`leave`](Self::leave).
    fn enter(&self) {
        let mut s = self.lock();
        while s.0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.1 += 1;
    }

    /// Enters a write if the barrier is open (never waits); leave with [`leave`](Self::leave).
    fn try_enter(&self) -> bool {
        let mut s = self.lock();
        if s.0 {
            return false;
        }
        s.1 += 1;
        true
    }

    fn leave(&self) {
        self.lock().1 -= 1;
        self.changed.notify_all();
    }

    /// Closes the barrier and waits until no write is inside.
    fn close(&self) {
        let mut s = self.lock();
        s.0 = true;
        while s.1 > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        self.lock().0 = false;
        self.changed.notify_all();
    }
}

/// A write's entry through the barrier (owns the export); leaves on drop.
struct OwnedEntered(Arc<Export>);

/// How [`Export::enter_write`] meets a step that would wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Wait for it (the blocking path).
    Block,
    /// Give up (the connection's task, the asynchronous path).
    GiveUp,
}

/// Why an admission did not happen.
enum Refused {
    /// A step would have waited ([`Wait::GiveUp`] only).
    WouldWait,
    /// The write must fail (read-only, bitmaps not durable).
    Error(ExportError),
}

/// A write let in: inside the write barrier (a cut-over waits for it),
/// inside the bitmaps' write section (a drain waits for it), its bits
/// marked durably. Dropping it ends the write.
#[must_use]
pub struct Admission {
    _section: OwnedShared,
    _entered: OwnedEntered,
}

impl Drop for OwnedEntered {
    fn drop(&mut self) {
        self.0.barrier.leave();
    }
}

/// Writes to the export are held while this lives.
#[derive(Debug)]
pub struct QuiesceGuard(Arc<Export>);

impl Drop for QuiesceGuard {
    fn drop(&mut self) {
        self.0.barrier.open();
    }
}

/// All exports of the agent, by name.
#[derive(Debug, Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
}

/// Export names that reach an incoming migration target.
pub const MIGRATION_PREFIX: &str = "migration/";

/// Incoming tokens of disks hidden by a restore start with this: clients
/// do not find them by name until the restore serves them (a copy can take
/// hours; a client's IO must not time out meanwhile, it reconnects).
pub const RESTORE_TOKEN_PREFIX: &str = "restore-";

impl Exports {
    /// Resolves a name a client asked for: `VM/DISK` for every export
    /// (an incoming one holds that client's IO until it is activated; one
    /// hidden by a restore is not found), `migration/TOKEN/VM/DISK` for an
    /// incoming migration target's writer.
    pub fn resolve(&self, name: &str) -> Option<Arc<Export>> {
        if let Some(rest) = name.strip_prefix(MIGRATION_PREFIX) {
            let (token, disk) = rest.split_once('/')?;
            let export = self.get(disk)?;
            let expected = export.incoming()?;
            return constant_time_eq(expected.as_bytes(), token.as_bytes()).then_some(export);
        }
        self.get(name).filter(|e| !e.incoming().is_some_and(|t| t.starts_with(RESTORE_TOKEN_PREFIX)))
    }

    /// Looks an export up.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().get(name).cloned()
    }

    /// All exports, sorted by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.read().values().cloned().collect()
    }

    /// Adds or replaces an export; a replaced one is detached.
    pub fn insert(&self, export: Arc<Export>) {
        let old = self.write().insert(export.name.clone(), export);
        if let Some(old) = old {
            old.detached.cancel();
        }
    }

    /// Removes an export and closes its connections.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let old = self.write().remove(name);
        if let Some(old) = &old {
            old.detached.cancel();
        }
        old
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.map.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Disks being prepared as incoming migration targets, with their tokens;
/// consulted when an export is created so it is never visible by its own
/// name before the migration activates it.
#[derive(Debug, Default)]
pub struct Incoming(Mutex<std::collections::HashMap<String, String>>);

impl Incoming {
    /// Marks `disk` incoming with `token`.
    pub fn insert(&self, disk: &str, token: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(disk.to_owned(), token.to_owned());
    }

    /// Forgets `disk`.
    pub fn remove(&self, disk: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(disk);
    }

    /// The token of `disk`, if it is incoming.
    pub fn token(&self, disk: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(disk).cloned()
    }
}
