//! Test-only tools, compiled only in tests: pause points for narrow
//! interleavings, and a global allocator that notes each thread's largest
//! allocation.
//!
//! # Pause points
//!
//! Code calls [`at`] with a point's name and a key (a bitmap's name, an
//! image path); a test that [`set`] a hook for that point and key has it
//! run there, once. Keys keep tests that run in parallel apart. Outside
//! `cfg(test)` neither the module nor its calls exist.

use std::sync::Mutex;

type Hook = Box<dyn FnOnce() + Send>;

static HOOKS: Mutex<Vec<(&'static str, String, Hook)>> = Mutex::new(Vec::new());

/// Runs `hook` the next time code reaches `point` with `key`.
pub(crate) fn set(point: &'static str, key: &str, hook: impl FnOnce() + Send + 'static) {
    HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push((point, key.to_owned(), Box::new(hook)));
}

/// A pause point: runs the hook set for `point` and `key`, if any.
pub(crate) fn at(point: &'static str, key: &str) {
    let hook = {
        let mut hooks = HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        let found = hooks.iter().position(|(p, k, _)| *p == point && k == key);
        found.map(|i| hooks.remove(i).2)
    };
    if let Some(hook) = hook {
        hook();
    }
}

/// The largest single allocation the current thread made since [`reset_largest_allocation`]
/// (the test binary's global allocator records it): tests check that a length a peer sent
/// never sizes a buffer.
pub(crate) fn largest_allocation() -> usize {
    LARGEST.with(std::cell::Cell::get)
}

/// Starts a new [`largest_allocation`] measurement on this thread.
pub(crate) fn reset_largest_allocation() {
    LARGEST.with(|c| c.set(0));
}

thread_local! {
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

/// The system allocator, noting each thread's largest allocation.
pub(crate) struct Probe;

// SAFETY: every call is passed on unchanged to the system allocator; `note` touches only a
// const-initialised thread-local `Cell` (no allocation, no destructor).
unsafe impl std::alloc::GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, which is the system's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static PROBE: Probe = Probe;
