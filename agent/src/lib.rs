//! rbdsync agent: serves VM disks over NBD, tracks every write in dirty
//! bitmaps, backs disks up to Ceph RBD (or `file:` images), and migrates
//! them between hosts with a mirror seeded from a bitmap.
//!
//! # Planes
//! - **Data plane**: [`nbd`] connections → [`export::Export`] (range checks,
//!   bitmap marking, job hooks) → [`store::BlockStore`]. A request runs on
//!   the store's asynchronous path (RBD), inline on its connection's task
//!   (page-cache `file:` IO), or on tokio's blocking pool; nothing on this
//!   path takes a lock shared across disks. Code on it that must block waits
//!   through `rt::blocking`, and nothing that holds a lock a guest write
//!   waits for may itself wait for a blocking-pool thread.
//! - **Jobs** ([`jobs`]): backup, mirror, stream, verify, each a persisted
//!   state machine working in bounded chunks beside the guest's IO.
//! - **Control plane**: the daemon ([`daemon`]) owns the export registry
//!   and applies configuration (startup, SIGHUP reload); the control API
//!   ([`api`]) and the CLI ([`cli`]) drive it.
//!
//! # Ownership
//! The registry ([`export::Exports`]) holds one `Arc<Export>` per disk;
//! connections hold clones, so removing an export cancels its token and the
//! last connection to finish drops the store.
pub mod api;
pub mod bitmap;
pub mod bits;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod events;
pub mod export;
pub mod fuzzing;
pub mod jobs;
pub mod metrics;
pub mod nbd;
mod rt;
pub mod store;
pub mod systemd;
#[cfg(test)]
mod testkit;
pub mod tls;
