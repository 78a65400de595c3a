//! The NBD server: listeners, connections, and the transmission data path.
//!
//! ```text
//!   listener (TCP / Unix) ──accept──► connection task
//!        negotiate: bytes ⇄ proto::ServerHandshake (catalog = Exports)
//!        transmit:  reader ──decode──► validate ──► execute on Export ──► reply bytes ──► writer task
//! ```
//! Each connection has one reader (the connection task) and one writer task.
//! A request runs on one of three paths (see `session`): the store's
//! asynchronous data path (RBD: no thread parked per request), inline on
//! the connection task (page-cache `file:` IO with no blocking job hook),
//! or tokio's blocking pool (everything else); replies go out in
//! completion order.
//! In-flight work per connection is bounded by a byte budget, so a client
//! cannot make the agent buffer more than that.

pub mod client;
pub mod connection;
pub mod server;
mod session;
pub mod tls;

pub use server::{NbdServer, ServerSettings};
