//! Client side of the transmission phase: decoding replies.
//!
//! Used by the agent's mirror (which writes to another agent over NBD) and by
//! tests. Simple replies carry no length, so the decoder asks the caller how
//! many data bytes follow a successful reply to a given cookie.

use bytes::{Buf, Bytes, BytesMut};

use crate::consts::{chunk, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::reply::{Extent, CHUNK_HEADER_LEN, SIMPLE_REPLY_LEN};
use crate::DecodeError;

/// One decoded reply or reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEvent {
    /// A simple reply; `data` holds READ data when `errno` is 0.
    Simple {
        /// Request cookie.
        cookie: u64,
        /// NBD error number, 0 on success.
        errno: u32,
        /// READ data, empty for other commands.
        data: Bytes,
    },
    /// `OFFSET_DATA` chunk.
    Data {
        /// Request cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// Offset of the data.
        offset: u64,
        /// The data.
        data: Bytes,
    },
    /// `OFFSET_HOLE` chunk.
    Hole {
        /// Request cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// Offset of the hole.
        offset: u64,
        /// Length of the hole.
        length: u32,
    },
    /// `BLOCK_STATUS` chunk.
    BlockStatus {
        /// Request cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// Metadata context id.
        context_id: u32,
        /// The extents.
        extents: Vec<Extent>,
    },
    /// `ERROR` or `ERROR_OFFSET` chunk.
    Error {
        /// Request cookie.
        cookie: u64,
        /// Last chunk of this reply.
        done: bool,
        /// NBD error number.
        errno: u32,
        /// Server's message.
        message: String,
    },
    /// `NONE` chunk (always final).
    None {
        /// Request cookie.
        cookie: u64,
    },
}

impl ReplyEvent {
    /// The cookie of the request this event answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. }
            | Self::Data { cookie, .. }
            | Self::Hole { cookie, .. }
            | Self::BlockStatus { cookie, .. }
            | Self::Error { cookie, .. }
            | Self::None { cookie } => *cookie,
        }
    }

    /// Whether this is the last event of its reply.
    pub fn is_done(&self) -> bool {
        match self {
            Self::Simple { .. } | Self::None { .. } => true,
            Self::Data { done, .. }
            | Self::Hole { done, .. }
            | Self::BlockStatus { done, .. }
            | Self::Error { done, .. } => *done,
        }
    }
}

/// Incremental reply decoder.
#[derive(Debug)]
pub struct ReplyDecoder {
    max_chunk: u32,
}

impl ReplyDecoder {
    /// A decoder that rejects chunks larger than `max_chunk` payload bytes.
    pub fn new(max_chunk: u32) -> Self {
        Self { max_chunk }
    }

    /// Decodes one event; `read_len(cookie)` returns the data length that
    /// follows a successful simple reply to `cookie` (None if no data).
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        read_len: &dyn Fn(u64) -> Option<u32>,
    ) -> Result<ReplyEvent, DecodeError> {
        if buf.len() < 4 {
            return Err(DecodeError::Incomplete);
        }
        match u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) {
            SIMPLE_REPLY_MAGIC => self.decode_simple(buf, read_len),
            STRUCTURED_REPLY_MAGIC => self.decode_chunk(buf),
            _ => Err(DecodeError::Invalid("reply magic")),
        }
    }

    fn decode_simple(
        &self,
        buf: &mut BytesMut,
        read_len: &dyn Fn(u64) -> Option<u32>,
    ) -> Result<ReplyEvent, DecodeError> {
        if buf.len() < SIMPLE_REPLY_LEN {
            return Err(DecodeError::Incomplete);
        }
        let errno = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let cookie = u64::from_be_bytes(buf[8..16].try_into().map_err(|_| DecodeError::Invalid("cookie"))?);
        let data_len = if errno == 0 { read_len(cookie).unwrap_or(0) } else { 0 };
        if data_len > self.max_chunk {
            return Err(DecodeError::Invalid("read length"));
        }
        let data_len = usize::try_from(data_len).map_err(|_| DecodeError::Invalid("read length"))?;
        if buf.len() < SIMPLE_REPLY_LEN + data_len {
            return Err(DecodeError::Incomplete);
        }
        buf.advance(SIMPLE_REPLY_LEN);
        Ok(ReplyEvent::Simple { cookie, errno, data: buf.split_to(data_len).freeze() })
    }

    fn decode_chunk(&self, buf: &mut BytesMut) -> Result<ReplyEvent, DecodeError> {
        if buf.len() < CHUNK_HEADER_LEN {
            return Err(DecodeError::Incomplete);
        }
        let flags = u16::from_be_bytes([buf[4], buf[5]]);
        let ty = u16::from_be_bytes([buf[6], buf[7]]);
        let cookie = u64::from_be_bytes(buf[8..16].try_into().map_err(|_| DecodeError::Invalid("cookie"))?);
        let length = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if length > self.max_chunk.saturating_add(64) {
            return Err(DecodeError::Invalid("chunk length"));
        }
        let len = usize::try_from(length).map_err(|_| DecodeError::Invalid("chunk length"))?;
        if buf.len() < CHUNK_HEADER_LEN + len {
            return Err(DecodeError::Incomplete);
        }
        buf.advance(CHUNK_HEADER_LEN);
        let mut body = buf.split_to(len).freeze();
        let done = flags & chunk::FLAG_DONE != 0;
        parse_chunk(ty, cookie, done, &mut body)
    }
}

fn parse_chunk(ty: u16, cookie: u64, done: bool, body: &mut Bytes) -> Result<ReplyEvent, DecodeError> {
    let need = |b: &Bytes, n: usize| if b.len() < n { Err(DecodeError::Invalid("chunk too short")) } else { Ok(()) };
    match ty {
        chunk::NONE if body.is_empty() && done => Ok(ReplyEvent::None { cookie }),
        chunk::OFFSET_DATA => {
            need(body, 9)?;
            let offset = body.get_u64();
            Ok(ReplyEvent::Data { cookie, done, offset, data: std::mem::take(body) })
        }
        chunk::OFFSET_HOLE if body.len() == 12 => {
            let offset = body.get_u64();
            Ok(ReplyEvent::Hole { cookie, done, offset, length: body.get_u32() })
        }
        chunk::BLOCK_STATUS if body.len() >= 12 && (body.len() - 4).is_multiple_of(8) => {
            let context_id = body.get_u32();
            let extents = body.chunks_exact(8).map(|c| Extent {
                length: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                flags: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
            });
            Ok(ReplyEvent::BlockStatus { cookie, done, context_id, extents: extents.collect() })
        }
        chunk::ERROR | chunk::ERROR_OFFSET => {
            need(body, 6)?;
            let errno = body.get_u32();
            let msg_len = usize::from(body.get_u16());
            need(body, msg_len)?;
            let message = String::from_utf8_lossy(&body[..msg_len]).into_owned();
            Ok(ReplyEvent::Error { cookie, done, errno, message })
        }
        _ => Err(DecodeError::Invalid("chunk type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_read_reply_takes_its_data_length_from_the_caller() {
        let mut b = BytesMut::new();
        crate::reply::simple(&mut b, 42, 0);
        b.extend_from_slice(b"data");
        let mut dec = ReplyDecoder::new(1024);
        let partial = &mut BytesMut::from(&b[..18]);
        assert_eq!(dec.decode(partial, &|_| Some(4)), Err(DecodeError::Incomplete));
        assert_eq!(
            dec.decode(&mut b, &|c| (c == 42).then_some(4)),
            Ok(ReplyEvent::Simple { cookie: 42, errno: 0, data: Bytes::from_static(b"data") })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = ReplyDecoder::new(128);
            while dec.decode(&mut buf, &|_| Some(16)).is_ok() {}
        }
    }
}
