//! Blocking waits on whatever thread a write path runs on.
//!
//! A write runs on the connection's task (a runtime worker) or on the
//! blocking pool. Code on that path that must block (a hand-off waiting
//! for in-flight writes, an active mirror waiting for the destination)
//! goes through [`blocking`], which on a worker first hands the worker's
//! other tasks to another thread, so the runtime keeps running (and
//! tokio's blocking primitives, which refuse to run on a worker, work).

/// Runs `f`, which may block: through `block_in_place` on a multi-thread
/// runtime (on a worker it moves the worker's tasks away first; elsewhere
/// it just runs `f`); directly outside a runtime and on a current-thread
/// runtime (tests), which has no other thread to hand tasks to.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let current_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if current_thread {
        f()
    } else {
        tokio::task::block_in_place(f)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_may_block_on_a_runtime_future_through_it() {
        // On a worker (a spawned task, as a connection's task is), `blocking_lock` and `block_on`
        // alone panic ("Cannot block the current thread from within a runtime").
        let got = tokio::spawn(async {
            let lock = tokio::sync::Mutex::new(0u32);
            let handle = tokio::runtime::Handle::current();
            super::blocking(|| {
                let mut guard = lock.blocking_lock();
                *guard += 1;
                handle.block_on(async { tokio::task::yield_now().await });
                *guard
            })
        })
        .await
        .unwrap();
        assert_eq!(got, 1);
        // And on a blocking-pool thread.
        let got = tokio::task::spawn_blocking(|| super::blocking(|| 2)).await.unwrap();
        assert_eq!(got, 2);
    }
}
