//! Transmission-phase replies: simple replies and structured reply chunks.
//!
//! Encoders write headers only; the caller appends read data after an
//! `OFFSET_DATA` or simple-reply header, so data is never copied twice.

use bytes::BufMut;

use crate::consts::{chunk, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an `OFFSET_DATA` chunk header including its offset field.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// One extent of a `BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// Context-specific status flags.
    pub flags: u32,
}

/// Encodes a simple reply header; for a successful READ the data follows.
pub fn simple(out: &mut impl BufMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

fn chunk_header(out: &mut impl BufMut, cookie: u64, done: bool, ty: u16, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(if done { chunk::FLAG_DONE } else { 0 });
    out.put_u16(ty);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Encodes an `OFFSET_DATA` chunk header; `data_len` bytes of data follow.
pub fn offset_data(out: &mut impl BufMut, cookie: u64, done: bool, offset: u64, data_len: u32) {
    chunk_header(out, cookie, done, chunk::OFFSET_DATA, data_len.saturating_add(8));
    out.put_u64(offset);
}

/// Encodes an `OFFSET_HOLE` chunk.
pub fn offset_hole(out: &mut impl BufMut, cookie: u64, done: bool, offset: u64, length: u32) {
    chunk_header(out, cookie, done, chunk::OFFSET_HOLE, 12);
    out.put_u64(offset);
    out.put_u32(length);
}

/// Encodes an empty final chunk.
pub fn none(out: &mut impl BufMut, cookie: u64) {
    chunk_header(out, cookie, true, chunk::NONE, 0);
}

/// Encodes an `ERROR` chunk; the message is truncated to 4 KiB on a character boundary.
pub fn error(out: &mut impl BufMut, cookie: u64, done: bool, errno: u32, message: &str) {
    let msg = truncate(message, 4096);
    let msg_len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    chunk_header(out, cookie, done, chunk::ERROR, 6 + u32::from(msg_len));
    out.put_u32(errno);
    out.put_u16(msg_len);
    out.put_slice(&msg.as_bytes()[..usize::from(msg_len)]);
}

/// Encodes a `BLOCK_STATUS` chunk for one metadata context.
pub fn block_status(out: &mut impl BufMut, cookie: u64, done: bool, context_id: u32, extents: &[Extent]) {
    let len = extents.len().saturating_mul(8).saturating_add(4);
    chunk_header(out, cookie, done, chunk::BLOCK_STATUS, u32::try_from(len).unwrap_or(u32::MAX));
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ReplyDecoder, ReplyEvent};
    use bytes::BytesMut;

    #[test]
    fn structured_chunks_round_trip_through_the_client_decoder() {
        let mut b = BytesMut::new();
        offset_data(&mut b, 5, false, 512, 3);
        b.extend_from_slice(b"abc");
        offset_hole(&mut b, 5, false, 515, 100);
        block_status(&mut b, 6, true, 2, &[Extent { length: 4096, flags: 3 }]);
        error(&mut b, 7, true, 22, "bad");
        simple(&mut b, 8, 0);
        none(&mut b, 9);
        let mut dec = ReplyDecoder::new(1 << 20);
        let got: Vec<ReplyEvent> = std::iter::from_fn(|| dec.decode(&mut b, &|_| None).ok()).collect();
        assert_eq!(
            got,
            vec![
                ReplyEvent::Data { cookie: 5, done: false, offset: 512, data: bytes::Bytes::from_static(b"abc") },
                ReplyEvent::Hole { cookie: 5, done: false, offset: 515, length: 100 },
                ReplyEvent::BlockStatus {
                    cookie: 6,
                    done: true,
                    context_id: 2,
                    extents: vec![Extent { length: 4096, flags: 3 }]
                },
                ReplyEvent::Error { cookie: 7, done: true, errno: 22, message: "bad".into() },
                ReplyEvent::Simple { cookie: 8, errno: 0, data: bytes::Bytes::new() },
                ReplyEvent::None { cookie: 9 },
            ]
        );
    }

    #[test]
    fn long_error_messages_are_truncated_on_char_boundary() {
        let msg = "é".repeat(3000);
        let mut b = BytesMut::new();
        error(&mut b, 1, true, 5, &msg);
        let len = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert!(len <= 4096 && std::str::from_utf8(&b[26..26 + len]).is_ok());
    }
}
