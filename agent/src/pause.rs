//! Test-only pause points, for tests of narrow interleavings.
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
