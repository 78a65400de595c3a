//! Transmission-phase requests: decoding (server side) and encoding (client side).
//!
//! The decoder separates "not enough bytes yet" ([`DecodeError::Incomplete`])
//! from "these bytes can never be valid" ([`DecodeError::Invalid`]). Only the
//! latter ends a connection; a well-formed request with a bad meaning (an
//! unknown command, a range past the end) is returned to the caller, which
//! answers it with an error and carries on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{cmd, REQUEST_MAGIC};
use crate::DecodeError;

/// Size of a compact request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A command type as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other command type; answered with `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// Maps a wire command type to a command.
    pub fn from_wire(value: u16) -> Self {
        match value {
            cmd::READ => Self::Read,
            cmd::WRITE => Self::Write,
            cmd::DISC => Self::Disc,
            cmd::FLUSH => Self::Flush,
            cmd::TRIM => Self::Trim,
            cmd::CACHE => Self::Cache,
            cmd::WRITE_ZEROES => Self::WriteZeroes,
            cmd::BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire command type.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => cmd::READ,
            Self::Write => cmd::WRITE,
            Self::Disc => cmd::DISC,
            Self::Flush => cmd::FLUSH,
            Self::Trim => cmd::TRIM,
            Self::Cache => cmd::CACHE,
            Self::WriteZeroes => cmd::WRITE_ZEROES,
            Self::BlockStatus => cmd::BLOCK_STATUS,
            Self::Unknown(other) => other,
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Opaque cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// The command.
    pub command: Command,
    /// Command flags (`NBD_CMD_FLAG_*`), unchecked.
    pub flags: u16,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (payload length for WRITE).
    pub length: u32,
}

impl Request {
    /// End of the requested range, or `None` if `offset + length` overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }

    /// Whether a command flag bit is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Encodes the header (client side); a WRITE payload must follow.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command.to_wire());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A request; `payload` holds the data of a WRITE (empty otherwise).
    Request(Request, Bytes),
    /// A WRITE whose payload exceeded the maximum: the payload was read and
    /// dropped, and the caller must answer `EOVERFLOW`.
    Oversized(Request),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload(Request),
    Skip(Request, u64),
}

/// Incremental request decoder for one connection.
#[derive(Debug)]
pub struct RequestDecoder {
    max_payload: u32,
    state: State,
}

impl RequestDecoder {
    /// A decoder that accepts WRITE payloads up to `max_payload` bytes and
    /// discards (without buffering) anything larger.
    pub fn new(max_payload: u32) -> Self {
        Self { max_payload, state: State::Header }
    }

    /// Bytes the decoder needs before it can make progress (a read-size hint).
    pub fn wanted(&self) -> usize {
        match self.state {
            State::Header => REQUEST_HEADER_LEN,
            State::Payload(req) => usize::try_from(req.length).unwrap_or(usize::MAX),
            State::Skip(_, left) => usize::try_from(left).unwrap_or(usize::MAX),
        }
    }

    /// Decodes the next request from `buf`, consuming what it used.
    ///
    /// Returns [`DecodeError::Incomplete`] when more bytes are needed (a
    /// partial header or payload stays buffered, an oversized payload is
    /// consumed as it arrives) and [`DecodeError::Invalid`] when the stream
    /// cannot be a request stream (bad magic).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        loop {
            match self.state {
                State::Header => {
                    let req = decode_header(buf)?;
                    if req.command != Command::Write || req.length == 0 {
                        return Ok(Decoded::Request(req, Bytes::new()));
                    }
                    self.state = if req.length > self.max_payload {
                        State::Skip(req, u64::from(req.length))
                    } else {
                        State::Payload(req)
                    };
                }
                State::Payload(req) => {
                    let len = usize::try_from(req.length).map_err(|_| DecodeError::Invalid("length"))?;
                    if buf.len() < len {
                        buf.reserve(len - buf.len());
                        return Err(DecodeError::Incomplete);
                    }
                    self.state = State::Header;
                    return Ok(Decoded::Request(req, buf.split_to(len).freeze()));
                }
                State::Skip(req, left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    buf.advance(take);
                    let left = left - take as u64;
                    if left > 0 {
                        self.state = State::Skip(req, left);
                        return Err(DecodeError::Incomplete);
                    }
                    self.state = State::Header;
                    return Ok(Decoded::Oversized(req));
                }
            }
        }
    }
}

fn decode_header(buf: &mut BytesMut) -> Result<Request, DecodeError> {
    if buf.len() < REQUEST_HEADER_LEN {
        return Err(DecodeError::Incomplete);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::Invalid("request magic"));
    }
    buf.advance(4);
    let flags = buf.get_u16();
    let command = Command::from_wire(buf.get_u16());
    let cookie = buf.get_u64();
    let offset = buf.get_u64();
    let length = buf.get_u32();
    Ok(Request { cookie, command, flags, offset, length })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consts::cmd_flags;
    use proptest::prelude::*;

    fn encoded(req: &Request, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        req.encode(&mut b);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn write_round_trips_with_payload() {
        let req = Request { cookie: 7, command: Command::Write, flags: cmd_flags::FUA, offset: 4096, length: 5 };
        let mut buf = encoded(&req, b"hello");
        let mut dec = RequestDecoder::new(1024);
        assert_eq!(dec.decode(&mut buf), Ok(Decoded::Request(req, Bytes::from_static(b"hello"))));
        assert!(buf.is_empty());
    }

    #[test]
    fn split_input_is_incomplete_until_whole() {
        let req = Request { cookie: 1, command: Command::Write, flags: 0, offset: 0, length: 3 };
        let all = encoded(&req, b"abc");
        let mut dec = RequestDecoder::new(1024);
        let mut buf = BytesMut::new();
        for (i, byte) in all.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let res = dec.decode(&mut buf);
            if i + 1 < all.len() {
                assert_eq!(res, Err(DecodeError::Incomplete), "at byte {i}");
            } else {
                assert_eq!(res, Ok(Decoded::Request(req, Bytes::from_static(b"abc"))));
            }
        }
    }

    #[test]
    fn oversized_write_is_skipped_then_stream_continues() {
        let big = Request { cookie: 2, command: Command::Write, flags: 0, offset: 0, length: 10 };
        let next = Request { cookie: 3, command: Command::Flush, flags: 0, offset: 0, length: 0 };
        let mut buf = encoded(&big, &[0xaa; 10]);
        next.encode(&mut buf);
        let mut dec = RequestDecoder::new(4);
        assert_eq!(dec.decode(&mut buf), Ok(Decoded::Oversized(big)));
        assert_eq!(dec.decode(&mut buf), Ok(Decoded::Request(next, Bytes::new())));
    }

    #[test]
    fn bad_magic_is_invalid() {
        let mut buf = BytesMut::from(&[0u8; 28][..]);
        assert_eq!(RequestDecoder::new(16).decode(&mut buf), Err(DecodeError::Invalid("request magic")));
    }

    #[test]
    fn unknown_command_is_decoded_not_rejected() {
        let req = Request { cookie: 9, command: Command::Unknown(99), flags: 0, offset: 1, length: 2 };
        let mut buf = encoded(&req, &[]);
        assert_eq!(RequestDecoder::new(16).decode(&mut buf), Ok(Decoded::Request(req, Bytes::new())));
        assert_eq!(req.end(), Some(3));
        let wrap = Request { offset: u64::MAX, ..req };
        assert_eq!(wrap.end(), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut dec = RequestDecoder::new(64);
            let mut buf = BytesMut::new();
            for c in chunks {
                buf.extend_from_slice(&c);
                loop {
                    match dec.decode(&mut buf) {
                        Ok(_) => continue,
                        Err(DecodeError::Incomplete) => break,
                        Err(DecodeError::Invalid(_)) => return Ok(()),
                    }
                }
            }
        }

        #[test]
        fn any_request_round_trips(cookie: u64, ty in 0u16..12, flags: u16, offset: u64, length in 0u32..256) {
            let command = Command::from_wire(ty);
            let req = Request { cookie, command, flags, offset, length };
            let payload = if command == Command::Write { vec![0x5a; length as usize] } else { vec![] };
            let mut buf = encoded(&req, &payload);
            let got = RequestDecoder::new(1 << 20).decode(&mut buf).unwrap();
            prop_assert_eq!(got, Decoded::Request(req, Bytes::from(payload)));
            prop_assert!(buf.is_empty());
        }
    }
}
