//! The NBD wire protocol, sans-IO.
//!
//! This crate turns bytes into protocol events and events into bytes; it owns
//! no sockets, spawns no tasks and reads no clock, so every path can be driven
//! byte by byte from a test or a fuzzer. The agent's connection driver only
//! reads from its socket, calls `handle`/`decode`, and writes what was produced.
//!
//! Supported subset (fixed newstyle only):
//! - negotiation ([`handshake`]): `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`
//!   (`NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `STARTTLS`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`; anything
//!   else gets `NBD_REP_ERR_UNSUP` (extended headers are not offered);
//! - transmission ([`request`], [`reply`]): `READ`, `WRITE`, `DISC`, `FLUSH`,
//!   `TRIM`, `CACHE`, `WRITE_ZEROES`, `BLOCK_STATUS` with `FUA`, `NO_HOLE`,
//!   `FAST_ZERO`, `DF` and `REQ_ONE`; simple replies and structured chunks;
//! - client side ([`client`]): reply decoding for the mirror's NBD client.
//!
//! Decoders keep "need more bytes" ([`DecodeError::Incomplete`]) apart from
//! "bad bytes" ([`DecodeError::Invalid`]). This crate checks syntax only: it
//! never decides whether an offset is inside an export or a command is
//! allowed; the agent does.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod client;
pub mod consts;
pub mod fuzzing;
pub mod handshake;
pub mod meta;
pub mod reply;
pub mod request;

pub use handshake::{ExportCatalog, ExportInfo, HandshakeConfig, Negotiated, ServerHandshake, Step, TlsPolicy};
pub use meta::MetaContext;
pub use request::{Command, Decoded, Request, RequestDecoder};

/// Why a decoder could not produce a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More bytes are needed; nothing was consumed that cannot be resumed.
    #[error("incomplete input")]
    Incomplete,
    /// The bytes can never form a valid message; the connection must end.
    #[error("invalid {0}")]
    Invalid(&'static str),
}
