//! Host-wide job limits (`jobs:` in `agent.yaml`, changeable on reload):
//! a rate every job's copy shares, and how many jobs run at once.
//!
//! Admission is first come, first served: a job that finds every slot
//! taken waits in the queue (state `queued`) until one frees. The disks of
//! a VM backup (one point in time; a frozen guest must not wait) take a
//! slot at once, over the limit if need be, and count against it. Mirrors
//! take none: they live until their cut-over (days, for a manual one) and
//! would starve every other job; they draw on the shared rate like any
//! job. A migration's verify at its cut-over takes neither (the VM's disks
//! are read-only until it ends).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::throttle::TokenBucket;

/// How a job is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Waits for a slot when all are taken.
    Queue,
    /// Takes a slot at once (counted, never waits).
    Now,
    /// Takes no slot (mirrors); the shared rate applies.
    Exempt,
    /// Takes no slot and ignores the shared rate (work that holds a VM's
    /// disks read-only).
    Urgent,
}

#[derive(Debug, Default)]
struct Slots {
    /// Most jobs running at once (0 = unlimited).
    limit: u32,
    running: u32,
    next_ticket: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Slots {
    fn free(&self) -> bool {
        self.limit == 0 || self.running < self.limit
    }

    /// Hands free slots to the oldest waiters (a waiter that went away
    /// gets none).
    fn wake(&mut self) {
        while self.free() {
            let Some((_, tx)) = self.queue.pop_front() else { break };
            if tx.send(()).is_ok() {
                self.running += 1;
            }
        }
    }
}

/// The agent's job limits.
#[derive(Debug)]
pub struct HostLimits {
    slots: Mutex<Slots>,
    bucket: Mutex<TokenBucket>,
    epoch: Instant,
}

impl Default for HostLimits {
    fn default() -> Self {
        Self { slots: Mutex::default(), bucket: Mutex::new(TokenBucket::new(0, Duration::ZERO)), epoch: Instant::now() }
    }
}

/// A running job's slot; freed on drop.
#[derive(Debug)]
pub struct Slot(Arc<HostLimits>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.0.slots();
        s.running = s.running.saturating_sub(1);
        s.wake();
    }
}

/// A queued job's place.
#[derive(Debug)]
pub struct Ticket {
    limits: Arc<HostLimits>,
    id: u64,
    rx: oneshot::Receiver<()>,
}

impl Ticket {
    /// Waits for the slot.
    pub async fn admitted(mut self) -> Slot {
        let limits = self.limits.clone();
        // A sender dropped unsent cannot happen while the ticket is queued (Slots owns it).
        let _ = (&mut self.rx).await;
        self.id = u64::MAX; // granted: Drop must not give it back twice
        Slot(limits)
    }
}

impl Drop for Ticket {
    /// A job cancelled while queued leaves the queue, or gives back the
    /// slot it was granted meanwhile.
    fn drop(&mut self) {
        if self.id == u64::MAX {
            return;
        }
        let mut s = self.limits.slots();
        let before = s.queue.len();
        let id = self.id;
        s.queue.retain(|(t, _)| *t != id);
        if s.queue.len() == before && self.rx.try_recv().is_ok() {
            s.running = s.running.saturating_sub(1);
            s.wake();
        }
    }
}

/// Either a slot now or a place in the queue.
#[derive(Debug)]
pub enum Admitted {
    /// Runs now.
    Running(Slot),
    /// Runs now without a slot.
    Exempt,
    /// Waits.
    Queued(Ticket),
}

impl HostLimits {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `jobs:` (at start-up and on reload): a higher limit starts
    /// queued jobs at once; a lower one lets running jobs finish.
    pub fn set(&self, max_running: u32, max_rate: u64) {
        let mut s = self.slots();
        s.limit = max_running;
        s.wake();
        drop(s);
        self.bucket.lock().unwrap_or_else(|p| p.into_inner()).set_rate(max_rate, self.epoch.elapsed());
    }

    /// Admits a job (see [`Admission`]).
    pub fn admit(self: &Arc<Self>, how: Admission) -> Admitted {
        if matches!(how, Admission::Exempt | Admission::Urgent) {
            return Admitted::Exempt;
        }
        let mut s = self.slots();
        if how == Admission::Now || (s.free() && s.queue.is_empty()) {
            s.running += 1;
            return Admitted::Running(Slot(self.clone()));
        }
        let (tx, rx) = oneshot::channel();
        s.next_ticket += 1;
        let id = s.next_ticket;
        s.queue.push_back((id, tx));
        Admitted::Queued(Ticket { limits: self.clone(), id, rx })
    }

    /// How long the host-wide rate makes `bytes` of copy wait.
    pub fn take(&self, bytes: u64) -> Duration {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner()).take(bytes, self.epoch.elapsed())
    }

    /// Jobs holding a slot, jobs queued.
    pub fn counts(&self) -> (u32, usize) {
        let s = self.slots();
        (s.running, s.queue.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(a: &Admitted) -> bool {
        matches!(a, Admitted::Running(_))
    }

    #[tokio::test]
    async fn queued_jobs_start_in_order_as_slots_free_and_on_a_higher_limit() {
        let limits = Arc::new(HostLimits::default());
        limits.set(1, 0);
        let first = limits.admit(Admission::Queue);
        let (second, third) = (limits.admit(Admission::Queue), limits.admit(Admission::Queue));
        assert!(running(&first) && !running(&second) && !running(&third));
        let urgent = limits.admit(Admission::Now);
        assert!(running(&urgent), "a job that must not wait runs over the limit");
        assert_eq!(limits.counts(), (2, 2));
        let (Admitted::Queued(second), Admitted::Queued(third)) = (second, third) else { unreachable!() };
        drop(first);
        drop(urgent);
        let second = tokio::time::timeout(Duration::from_secs(1), second.admitted()).await.expect("second admitted");
        assert_eq!(limits.counts(), (1, 1), "the third still waits");
        limits.set(2, 0);
        let third = tokio::time::timeout(Duration::from_secs(1), third.admitted()).await.expect("raised limit");
        assert_eq!(limits.counts(), (2, 0));
        drop((second, third));
        assert_eq!(limits.counts(), (0, 0));
    }

    #[test]
    fn a_job_cancelled_in_the_queue_takes_no_slot_with_it() {
        let limits = Arc::new(HostLimits::default());
        limits.set(1, 0);
        let first = limits.admit(Admission::Queue);
        let waiting = limits.admit(Admission::Queue);
        drop(waiting);
        assert_eq!(limits.counts(), (1, 0));
        // Granted, then dropped before it noticed: the slot comes back.
        let granted = limits.admit(Admission::Queue);
        drop(first);
        assert_eq!(limits.counts(), (1, 0));
        drop(granted);
        assert_eq!(limits.counts(), (0, 0));
        assert!(running(&limits.admit(Admission::Queue)));
    }
}
