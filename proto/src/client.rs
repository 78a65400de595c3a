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

/// What the client learned from negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNegotiated {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// Block sizes, if the server sent them (minimum, preferred, maximum).
    pub block_sizes: Option<(u32, u32, u32)>,
}

/// Why client negotiation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server's bytes are not a fixed-newstyle negotiation.
    #[error("invalid server negotiation: {0}")]
    Invalid(&'static str),
    /// The server refused an option.
    #[error("server refused {option}: error {code:#x}: {message}")]
    Refused {
        /// Option code.
        option: u32,
        /// `NBD_REP_ERR_*`.
        code: u32,
        /// Server's message.
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientPhase {
    Greeting,
    AwaitTls,
    Replies,
}

/// What the client driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Send `out`, read more, call again.
    NeedMore,
    /// Send `out`, run a TLS client handshake on the socket, call
    /// [`ClientHandshake::tls_started`], then carry on.
    StartTls,
    /// Negotiation finished.
    Done(ClientNegotiated),
}

/// Client side of fixed-newstyle negotiation: structured replies (if
/// wanted), then `NBD_OPT_GO` for one export.
#[derive(Debug)]
pub struct ClientHandshake {
    export: String,
    want_structured: bool,
    want_tls: bool,
    phase: ClientPhase,
    structured: bool,
    size: Option<(u64, u16)>,
    block_sizes: Option<(u32, u32, u32)>,
}

impl ClientHandshake {
    /// Negotiation for `export`; with `want_tls` it starts with STARTTLS.
    pub fn new(export: &str, want_structured: bool, want_tls: bool) -> Self {
        Self {
            export: export.to_owned(),
            want_structured,
            want_tls,
            phase: ClientPhase::Greeting,
            structured: false,
            size: None,
            block_sizes: None,
        }
    }

    /// TLS is up: sends the remaining options.
    pub fn tls_started(&mut self, out: &mut BytesMut) -> Result<(), ClientError> {
        self.phase = ClientPhase::Replies;
        self.send_options(out)
    }

    fn send_options(&mut self, out: &mut BytesMut) -> Result<(), ClientError> {
        use crate::consts::{info, opt};
        use bytes::BufMut;
        if self.want_structured {
            put_option(out, opt::STRUCTURED_REPLY, &[]);
        }
        let mut go = BytesMut::new();
        go.put_u32(u32::try_from(self.export.len()).map_err(|_| ClientError::Invalid("export name too long"))?);
        go.put_slice(self.export.as_bytes());
        go.put_u16(1);
        go.put_u16(info::BLOCK_SIZE);
        put_option(out, opt::GO, &go);
        Ok(())
    }

    /// Consumes server bytes, appends what to send, and says what to do next.
    pub fn handle(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<ClientStep, ClientError> {
        use crate::consts::{client_flags, handshake_flags, info, opt, rep, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC};
        use bytes::BufMut;
        if self.phase == ClientPhase::Greeting {
            if input.len() < 18 {
                return Ok(ClientStep::NeedMore);
            }
            if input.get_u64() != NBD_MAGIC || input.get_u64() != IHAVEOPT {
                return Err(ClientError::Invalid("greeting magic"));
            }
            let flags = input.get_u16();
            if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
                return Err(ClientError::Invalid("server is not fixed newstyle"));
            }
            let mut cflags = client_flags::FIXED_NEWSTYLE;
            if flags & handshake_flags::NO_ZEROES != 0 {
                cflags |= client_flags::NO_ZEROES;
            }
            out.put_u32(cflags);
            if self.want_tls {
                put_option(out, opt::STARTTLS, &[]);
                self.phase = ClientPhase::AwaitTls;
            } else {
                self.send_options(out)?;
                self.phase = ClientPhase::Replies;
            }
        }
        loop {
            if input.len() < 20 {
                return Ok(ClientStep::NeedMore);
            }
            let len = usize::try_from(u32::from_be_bytes([input[16], input[17], input[18], input[19]]))
                .map_err(|_| ClientError::Invalid("reply length"))?;
            if len > 1 << 20 {
                return Err(ClientError::Invalid("option reply too long"));
            }
            if input.len() < 20 + len {
                return Ok(ClientStep::NeedMore);
            }
            if input.get_u64() != OPTION_REPLY_MAGIC {
                return Err(ClientError::Invalid("option reply magic"));
            }
            let option = input.get_u32();
            let reply = input.get_u32();
            input.advance(4);
            let mut data = input.split_to(len).freeze();
            if self.phase == ClientPhase::AwaitTls {
                if option == opt::STARTTLS && reply == rep::ACK {
                    if !input.is_empty() {
                        return Err(ClientError::Invalid("data after the STARTTLS reply"));
                    }
                    return Ok(ClientStep::StartTls);
                }
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(ClientError::Refused { option, code: reply, message });
            }
            if reply & rep::ERR_BIT != 0 {
                if option == opt::STRUCTURED_REPLY {
                    continue;
                }
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(ClientError::Refused { option, code: reply, message });
            }
            match (option, reply) {
                (opt::STRUCTURED_REPLY, rep::ACK) => self.structured = true,
                (opt::GO, rep::INFO) if data.len() >= 2 => match data.get_u16() {
                    info::EXPORT if data.len() >= 10 => self.size = Some((data.get_u64(), data.get_u16())),
                    info::BLOCK_SIZE if data.len() >= 12 => {
                        self.block_sizes = Some((data.get_u32(), data.get_u32(), data.get_u32()));
                    }
                    _ => {}
                },
                (opt::GO, rep::ACK) => {
                    let (size, flags) =
                        self.size.ok_or(ClientError::Invalid("GO acknowledged without NBD_INFO_EXPORT"))?;
                    return Ok(ClientStep::Done(ClientNegotiated {
                        size,
                        flags,
                        structured_replies: self.structured,
                        block_sizes: self.block_sizes,
                    }));
                }
                _ => {}
            }
        }
    }
}

fn put_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    use bytes::BufMut;
    out.put_u64(crate::consts::IHAVEOPT);
    out.put_u32(option);
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.put_slice(data);
}

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use crate::handshake::{ExportCatalog, ExportInfo, HandshakeConfig, ServerHandshake, Step};

    struct One;
    impl ExportCatalog for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "vm/d").then(|| ExportInfo { name: name.into(), description: String::new(), size: 8192, flags: 1 })
        }
        fn list(&self) -> Vec<ExportInfo> {
            vec![]
        }
        fn meta_contexts(&self, _: &str) -> Vec<String> {
            vec![]
        }
    }

    /// Runs our client against our server, feeding bytes both ways.
    fn converse(export: &str) -> Result<ClientNegotiated, ClientError> {
        let mut server = ServerHandshake::new(HandshakeConfig::default());
        let mut client = ClientHandshake::new(export, true, false);
        let (mut to_client, mut to_server) = (BytesMut::new(), BytesMut::new());
        server.greeting(&mut to_client);
        for _ in 0..10 {
            if let ClientStep::Done(done) = client.handle(&mut to_client, &mut to_server)? {
                return Ok(done);
            }
            match server.handle(&mut to_server, &One, &mut to_client) {
                Ok(Step::NeedMore) | Ok(Step::Done(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        panic!("no progress")
    }

    #[test]
    fn client_and_server_agree() {
        let n = converse("vm/d").unwrap();
        assert_eq!((n.size, n.structured_replies, n.block_sizes), (8192, true, Some((512, 4096, 32 << 20))));
    }

    #[test]
    fn unknown_export_is_refused_with_the_servers_message() {
        let err = converse("nope").unwrap_err();
        assert!(matches!(err, ClientError::Refused { code, .. } if code == crate::consts::rep::ERR_UNKNOWN), "{err}");
    }
}
