//! The write gate of one disk: every write holds it shared from marking
//! its bits until its data reached the store; bitmap hand-offs (clear,
//! merge, a job's begin/commit) hold it exclusively, so they happen at a
//! moment with no write between "marked" and "stored".
//!
//! A reader-writer lock, with two things `std::sync::RwLock` lacks: a
//! shared hold that is owned and `Send` (an asynchronous write keeps it
//! across an `.await` on another thread's completion), and a `try` form
//! that never blocks (the async path must not park a runtime thread; it
//! falls back to the blocking path instead). Waiting writers (exclusive
//! holders) go first, so a steady stream of writes cannot starve a hand-off.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct State {
    /// Shared holders now.
    shared: usize,
    /// An exclusive holder now.
    exclusive: bool,
    /// Exclusive holders waiting.
    waiting: usize,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the gate shared, waiting while it is (or is about to be) held
    /// exclusively; the hold owns the gate.
    pub fn shared_owned(self: &Arc<Self>) -> OwnedShared {
        let mut s = self.lock();
        while s.exclusive || s.waiting > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.shared += 1;
        OwnedShared(self.clone())
    }

    /// Holds the gate shared if that needs no wait; the hold owns the gate.
    pub fn try_shared_owned(self: &Arc<Self>) -> Option<OwnedShared> {
        let mut s = self.lock();
        if s.exclusive || s.waiting > 0 {
            return None;
        }
        s.shared += 1;
        Some(OwnedShared(self.clone()))
    }

    /// Holds the gate exclusively, once every shared holder left.
    ///
    /// An asynchronous write leaves only when its task is polled after
    /// librbd's callback, so on a tokio worker the wait hands the worker's
    /// other tasks to another thread first (`block_in_place`): otherwise a
    /// hand-off on the only free worker would wait forever for a task that
    /// needs that worker.
    pub fn exclusive(&self) -> Exclusive<'_> {
        crate::rt::blocking(|| self.wait_exclusive())
    }

    fn wait_exclusive(&self) -> Exclusive<'_> {
        let mut s = self.lock();
        s.waiting += 1;
        while s.exclusive || s.shared > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.waiting -= 1;
        s.exclusive = true;
        Exclusive(self)
    }

    fn leave_shared(&self) {
        let mut s = self.lock();
        s.shared -= 1;
        if s.shared == 0 && s.waiting > 0 {
            self.changed.notify_all();
        }
    }

    fn leave_exclusive(&self) {
        self.lock().exclusive = false;
        self.changed.notify_all();
    }
}

/// A shared hold that owns the gate (`Send`, `'static`); released on drop.
#[must_use]
#[derive(Debug)]
pub struct OwnedShared(Arc<Gate>);

impl Drop for OwnedShared {
    fn drop(&mut self) {
        self.0.leave_shared();
    }
}

/// An exclusive hold; released on drop.
#[must_use]
#[derive(Debug)]
pub struct Exclusive<'a>(&'a Gate);

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.leave_exclusive();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::time::Duration;

    /// The deadlock this guards against: a runtime with one worker, a task
    /// holding the gate shared until it is polled again, and a hand-off on
    /// that worker. Without `block_in_place` the worker (and the timer it
    /// drives) stays blocked; a watchdog thread then aborts the test binary.
    #[test]
    fn a_hand_off_on_the_only_worker_lets_the_holding_task_run() {
        let finished = Arc::new(AtomicBool::new(false));
        let watch = finished.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(30));
            if !watch.load(SeqCst) {
                eprintln!("deadlock: the hand-off still waits for a task that needs its worker");
                std::process::abort();
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().unwrap();
        let done = runtime.block_on(async {
            let gate = Arc::new(Gate::default());
            let hold = gate.try_shared_owned().expect("free gate");
            let holder = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(hold);
            });
            let handoff = {
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _x = gate.exclusive();
                    true
                })
            };
            let done = tokio::time::timeout(Duration::from_secs(10), handoff).await;
            holder.await.unwrap();
            done
        });
        finished.store(true, SeqCst);
        assert!(matches!(done, Ok(Ok(true))), "the hand-off never got the gate: {done:?}");
    }

    #[test]
    fn exclusive_waits_for_shared_holders_and_blocks_new_ones() {
        let gate = Arc::new(Gate::default());
        let owned = gate.try_shared_owned().expect("free gate");
        let entered = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (gate, entered) = (gate.clone(), entered.clone());
            std::thread::spawn(move || {
                let _x = gate.exclusive();
                entered.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        // The exclusive holder is waiting: new shared holds are refused (try)
        // and the owned hold keeps it out.
        while gate.lock().waiting == 0 {
            std::thread::yield_now();
        }
        assert!(gate.try_shared_owned().is_none(), "a waiting exclusive holder goes first");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!entered.load(SeqCst), "exclusive entered while a shared hold was alive");
        drop(owned);
        // A blocking shared hold waits until the exclusive holder left.
        let _s = gate.shared_owned();
        assert!(entered.load(SeqCst));
        waiter.join().unwrap();
        let state = gate.lock();
        assert!(!state.exclusive && state.shared == 1);
    }
}
