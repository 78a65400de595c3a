//! The NBD server: listeners, connections, and the transmission data path.
//!
//! ```text
//!   listener (TCP / Unix) ──accept──► connection task
//!        negotiate: bytes ⇄ proto::ServerHandshake (catalog = Exports)
//!        transmit:  reader ──decode──► validate ──► blocking pool (execute on Export)
//!                                                        └──► reply bytes ──► writer task
//! ```
//! Each connection has one reader (the connection task) and one writer task;
//! requests run concurrently on tokio's blocking pool and reply out of order.
//! In-flight work per connection is bounded by a byte budget, so a client
//! cannot make the agent buffer more than that.

pub mod client;
pub mod connection;
pub mod server;
mod session;
pub mod tls;

pub use server::{NbdServer, ServerSettings};
