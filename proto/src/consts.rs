//! Protocol constants from the NBD specification (`doc/proto.md`).
//!
//! Names follow the specification without the `NBD_` prefix, grouped by the
//! phase of the protocol they belong to.

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that prefixes every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 2;
}

/// Client flags sent in reply to the greeting.
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 2;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Select an export and end negotiation (old style, no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation without selecting an export.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// Query an export without selecting it.
    pub const INFO: u32 = 6;
    /// Select an export and end negotiation.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Enable extended headers (not supported by this implementation).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Option acknowledged.
    pub const ACK: u32 = 1;
    /// One export in a LIST reply.
    pub const SERVER: u32 = 2;
    /// One information item in an INFO/GO reply.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit that marks an error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Option unknown to the server.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically or semantically invalid option.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Block size information must be requested first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// The option's payload is too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Export size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), sent per export.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The FUA command flag is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF command flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Multiple connections share one cache (flush on one covers all).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The FAST_ZERO command flag is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read data.
    pub const READ: u16 = 0;
    /// Write data (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard a range.
    pub const TRIM: u16 = 4;
    /// Prefetch a range.
    pub const CACHE: u16 = 5;
    /// Write zeroes to a range.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query block status through the selected metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must not be fragmented (structured replies only).
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: return one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail fast if zeroing is not fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// All flags this implementation understands.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// Empty chunk (only to end a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Error numbers on the wire (`NBD_E*`); independent of the host's errno values.
pub mod errno {
    /// Operation not permitted (e.g. write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large (request length over the maximum).
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Block status flags of the `base:allocation` context.
pub mod state {
    /// The range is a hole (not allocated).
    pub const HOLE: u32 = 1;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 2;
    /// `qemu:dirty-bitmap:NAME`: the range is dirty.
    pub const DIRTY: u32 = 1;
}

/// Meta context name of the allocation map.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty bitmap meta contexts.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
