//! rbdsync agent: serves VM disks over NBD, tracks every write in dirty
//! bitmaps, and (in later layers) backs disks up to Ceph RBD and migrates
//! them between hosts.
//!
//! # Planes
//! - **Data plane**: [`nbd`] connections → [`export::Export`] (range checks,
//!   bitmap marking) → [`store::BlockStore`]. Blocking IO runs on tokio's
//!   blocking pool; nothing on this path takes a lock shared across disks.
//! - **Control plane**: the daemon ([`daemon`]) owns the export registry
//!   and applies configuration (startup, SIGHUP reload).
//!
//! # Ownership
//! The registry ([`export::Exports`]) holds one `Arc<Export>` per disk;
//! connections hold clones, so removing an export cancels its token and the
//! last connection to finish drops the store.
pub mod api;
pub mod bitmap;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod export;
pub mod fuzzing;
pub mod jobs;
pub mod metrics;
pub mod nbd;
#[cfg(test)]
mod pause;
mod rt;
pub mod store;
