//! Server side of fixed-newstyle negotiation.
//!
//! [`ServerHandshake`] is a pure state machine: the driver writes
//! [`ServerHandshake::greeting`], then feeds every received byte to
//! [`ServerHandshake::handle`] together with an [`ExportCatalog`] (the
//! agent's view of the exports this client may see) and writes out whatever
//! the call appended to `out`, until it returns [`Step::Done`],
//! [`Step::StartTls`] or [`Step::Aborted`].
//!
//! Option-level problems (unknown export, bad lengths inside an option,
//! unsupported options) are answered with `NBD_REP_ERR_*` and negotiation
//! continues; only stream-level problems (bad magic, oversized option, too
//! many options, an `EXPORT_NAME` that cannot be satisfied) are errors that
//! end the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{client_flags, handshake_flags, info, opt, rep, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC};
use crate::meta::{MetaContext, MetaQuery};

/// Longest export name or metadata query accepted (spec: 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

/// What the server knows about one export, as advertised to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name (`VM/DISK`).
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`), `HAS_FLAGS` included.
    pub flags: u16,
}

/// Exports visible to one client.
pub trait ExportCatalog {
    /// Looks an export up by name.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// All exports this client may see.
    fn list(&self) -> Vec<ExportInfo>;
    /// Names of the metadata contexts an export offers (e.g. `base:allocation`).
    fn meta_contexts(&self, export: &str) -> Vec<String>;
    /// Called when the client is about to enter transmission on `export`
    /// (GO or EXPORT_NAME), after `lookup` found it; `Err((reply, message))`
    /// refuses it (e.g. `NBD_REP_ERR_POLICY` for a connection limit). An
    /// implementation that reserves something here keeps it for the
    /// connection. By default every client is admitted.
    fn admit(&self, export: &str) -> Result<(), (u32, String)> {
        let _ = export;
        Ok(())
    }
}

/// Whether and how TLS is offered on this listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    Unavailable,
    /// STARTTLS is accepted; plaintext clients are served too.
    Optional,
    /// Every option but STARTTLS and ABORT is refused until TLS is up.
    Required,
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// Static negotiation settings.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeConfig {
    /// TLS policy of the listener.
    pub tls: TlsPolicy,
    /// Block sizes to advertise.
    pub block_sizes: BlockSizes,
    /// Largest option payload accepted; larger ends the connection.
    pub max_option_len: u32,
    /// Most options accepted in one negotiation; more ends the connection.
    pub max_options: u32,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        Self {
            tls: TlsPolicy::Unavailable,
            block_sizes: BlockSizes { minimum: 512, preferred: 4096, maximum: 32 << 20 },
            max_option_len: 64 << 10,
            max_options: 1024,
        }
    }
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The selected export.
    pub export: ExportInfo,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// Selected metadata contexts, with the ids the client will see.
    pub meta_contexts: Vec<MetaContext>,
    /// The client asked for block sizes, so it promised to honour them.
    pub block_sizes_negotiated: bool,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write `out`, read more bytes, call again.
    NeedMore,
    /// Write `out`, then run a TLS server handshake on the socket, call
    /// [`ServerHandshake::tls_started`] and carry on.
    StartTls,
    /// Write `out`; negotiation finished, transmission begins.
    Done(Box<Negotiated>),
    /// Write `out` and close: the client aborted.
    Aborted,
}

/// Errors that end the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Bytes that cannot be part of a negotiation.
    #[error("invalid negotiation: {0}")]
    Invalid(&'static str),
    /// The client does not speak fixed newstyle.
    #[error("client does not support fixed newstyle")]
    NotFixedNewstyle,
    /// An option longer than the configured maximum.
    #[error("option payload of {0} bytes exceeds the limit")]
    OptionTooLong(u32),
    /// More options than the configured maximum.
    #[error("too many options")]
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` named an unknown export (no error reply exists).
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` named an export that refused the client (see
    /// [`ExportCatalog::admit`]; no error reply exists).
    #[error("export {0:?} refused: {1}")]
    Refused(String, String),
    /// `NBD_OPT_EXPORT_NAME` before TLS on a TLS-only listener.
    #[error("TLS required")]
    TlsRequired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
}

/// Server negotiation state for one connection.
#[derive(Debug)]
pub struct ServerHandshake {
    config: HandshakeConfig,
    phase: Phase,
    no_zeroes: bool,
    tls_active: bool,
    structured: bool,
    selection: Option<(String, Vec<MetaContext>)>,
    options_seen: u32,
}

struct OptionHeader {
    code: u32,
    data: Bytes,
}

impl ServerHandshake {
    /// A fresh negotiation.
    pub fn new(config: HandshakeConfig) -> Self {
        Self {
            config,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            tls_active: false,
            structured: false,
            selection: None,
            options_seen: 0,
        }
    }

    /// The server greeting, sent first.
    pub fn greeting(&self, out: &mut BytesMut) {
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    }

    /// TLS is now established; negotiation state is reset as the spec requires.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.selection = None;
    }

    /// Whether TLS is active on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Consumes input, appends replies to `out`, and says what to do next.
    pub fn handle(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        if self.phase == Phase::ClientFlags {
            if input.len() < 4 {
                return Ok(Step::NeedMore);
            }
            let flags = input.get_u32();
            if flags & client_flags::FIXED_NEWSTYLE == 0 {
                return Err(HandshakeError::NotFixedNewstyle);
            }
            if flags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
                return Err(HandshakeError::Invalid("unknown client flags"));
            }
            self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
            self.phase = Phase::Options;
        }
        loop {
            let option = match self.next_option(input)? {
                Some(o) => o,
                None => return Ok(Step::NeedMore),
            };
            let step = self.dispatch(option, catalog, out)?;
            if step != Step::NeedMore {
                return Ok(step);
            }
        }
    }

    fn next_option(&mut self, input: &mut BytesMut) -> Result<Option<OptionHeader>, HandshakeError> {
        if input.len() < 16 {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(input[..8].try_into().map_err(|_| HandshakeError::Invalid("option"))?);
        if magic != IHAVEOPT {
            return Err(HandshakeError::Invalid("option magic"));
        }
        let code = u32::from_be_bytes([input[8], input[9], input[10], input[11]]);
        let len = u32::from_be_bytes([input[12], input[13], input[14], input[15]]);
        if len > self.config.max_option_len {
            return Err(HandshakeError::OptionTooLong(len));
        }
        let len = usize::try_from(len).map_err(|_| HandshakeError::OptionTooLong(len))?;
        if input.len() < 16 + len {
            input.reserve(16 + len - input.len());
            return Ok(None);
        }
        self.options_seen += 1;
        if self.options_seen > self.config.max_options {
            return Err(HandshakeError::TooManyOptions);
        }
        input.advance(16);
        Ok(Some(OptionHeader { code, data: input.split_to(len).freeze() }))
    }

    fn dispatch(
        &mut self,
        option: OptionHeader,
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        let OptionHeader { code, data } = option;
        let tls_missing = self.config.tls == TlsPolicy::Required && !self.tls_active;
        match code {
            opt::ABORT => {
                option_reply(out, code, rep::ACK, &[]);
                Ok(Step::Aborted)
            }
            opt::STARTTLS => Ok(self.starttls(&data, out)),
            opt::EXPORT_NAME if tls_missing => Err(HandshakeError::TlsRequired),
            opt::EXPORT_NAME => self.export_name(&data, catalog, out),
            _ if tls_missing => {
                option_error(out, code, rep::ERR_TLS_REQD, "TLS is required on this listener");
                Ok(Step::NeedMore)
            }
            opt::LIST => {
                self.list(&data, catalog, out);
                Ok(Step::NeedMore)
            }
            opt::INFO | opt::GO => Ok(self.info_or_go(code, data, catalog, out)),
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    option_reply(out, code, rep::ACK, &[]);
                } else {
                    option_error(out, code, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data");
                }
                Ok(Step::NeedMore)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(code, data, catalog, out);
                Ok(Step::NeedMore)
            }
            _ => {
                option_error(out, code, rep::ERR_UNSUP, "option not supported");
                Ok(Step::NeedMore)
            }
        }
    }

    fn starttls(&mut self, data: &[u8], out: &mut BytesMut) -> Step {
        if !data.is_empty() {
            option_error(out, opt::STARTTLS, rep::ERR_INVALID, "STARTTLS takes no data");
        } else if self.tls_active {
            option_error(out, opt::STARTTLS, rep::ERR_INVALID, "TLS already active");
        } else if self.config.tls == TlsPolicy::Unavailable {
            option_error(out, opt::STARTTLS, rep::ERR_POLICY, "TLS is not configured on this listener");
        } else {
            option_reply(out, opt::STARTTLS, rep::ACK, &[]);
            return Step::StartTls;
        }
        Step::NeedMore
    }

    fn export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        let name = String::from_utf8_lossy(data).into_owned();
        let export = catalog.lookup(&name).ok_or_else(|| HandshakeError::UnknownExport(name.clone()))?;
        catalog.admit(&name).map_err(|(_, message)| HandshakeError::Refused(name, message))?;
        out.put_u64(export.size);
        out.put_u16(export.flags);
        if !self.no_zeroes {
            out.put_bytes(0, 124);
        }
        Ok(Step::Done(Box::new(self.finish(export, false))))
    }

    fn list(&self, data: &[u8], catalog: &dyn ExportCatalog, out: &mut BytesMut) {
        if !data.is_empty() {
            return option_error(out, opt::LIST, rep::ERR_INVALID, "LIST takes no data");
        }
        for export in catalog.list() {
            let mut body = BytesMut::with_capacity(4 + export.name.len() + export.description.len());
            put_string(&mut body, &export.name);
            body.put_slice(export.description.as_bytes());
            option_reply(out, opt::LIST, rep::SERVER, &body);
        }
        option_reply(out, opt::LIST, rep::ACK, &[]);
    }

    fn info_or_go(&mut self, code: u32, mut data: Bytes, catalog: &dyn ExportCatalog, out: &mut BytesMut) -> Step {
        let Some((name, requests)) = parse_info_request(&mut data) else {
            option_error(out, code, rep::ERR_INVALID, "malformed INFO/GO request");
            return Step::NeedMore;
        };
        let Some(export) = catalog.lookup(&name) else {
            option_error(out, code, rep::ERR_UNKNOWN, &format!("unknown export {name:?}"));
            return Step::NeedMore;
        };
        if code == opt::GO {
            if let Err((reply, message)) = catalog.admit(&name) {
                option_error(out, code, reply, &message);
                return Step::NeedMore;
            }
        }
        let mut body = BytesMut::new();
        body.put_u16(info::EXPORT);
        body.put_u64(export.size);
        body.put_u16(export.flags);
        option_reply(out, code, rep::INFO, &body);
        if requests.contains(&info::NAME) {
            let mut body = BytesMut::new();
            body.put_u16(info::NAME);
            body.put_slice(export.name.as_bytes());
            option_reply(out, code, rep::INFO, &body);
        }
        if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
            let mut body = BytesMut::new();
            body.put_u16(info::DESCRIPTION);
            body.put_slice(export.description.as_bytes());
            option_reply(out, code, rep::INFO, &body);
        }
        let sizes = self.config.block_sizes;
        let mut body = BytesMut::new();
        body.put_u16(info::BLOCK_SIZE);
        body.put_u32(sizes.minimum);
        body.put_u32(sizes.preferred);
        body.put_u32(sizes.maximum);
        option_reply(out, code, rep::INFO, &body);
        option_reply(out, code, rep::ACK, &[]);
        if code == opt::INFO {
            return Step::NeedMore;
        }
        let asked_sizes = requests.contains(&info::BLOCK_SIZE);
        Step::Done(Box::new(self.finish(export, asked_sizes)))
    }

    fn meta_context(&mut self, code: u32, mut data: Bytes, catalog: &dyn ExportCatalog, out: &mut BytesMut) {
        let Some((export, queries)) = parse_meta_request(&mut data) else {
            return option_error(out, code, rep::ERR_INVALID, "malformed meta context request");
        };
        if code == opt::SET_META_CONTEXT && !self.structured {
            return option_error(out, code, rep::ERR_INVALID, "structured replies must be negotiated first");
        }
        if catalog.lookup(&export).is_none() {
            return option_error(out, code, rep::ERR_UNKNOWN, &format!("unknown export {export:?}"));
        }
        let available = catalog.meta_contexts(&export);
        let matches: Vec<&String> = if code == opt::LIST_META_CONTEXT {
            available.iter().filter(|c| queries.is_empty() || queries.iter().any(|q| q.matches_listing(c))).collect()
        } else {
            available.iter().filter(|c| queries.iter().any(|q| q.matches_exactly(c))).collect()
        };
        let mut selected = Vec::new();
        for (index, name) in matches.into_iter().enumerate() {
            let id = if code == opt::SET_META_CONTEXT { u32::try_from(index + 1).unwrap_or(u32::MAX) } else { 0 };
            let mut body = BytesMut::with_capacity(4 + name.len());
            body.put_u32(id);
            body.put_slice(name.as_bytes());
            option_reply(out, code, rep::META_CONTEXT, &body);
            selected.push(MetaContext { id, name: name.clone() });
        }
        if code == opt::SET_META_CONTEXT {
            self.selection = Some((export, selected));
        }
        option_reply(out, code, rep::ACK, &[]);
    }

    fn finish(&mut self, export: ExportInfo, block_sizes_negotiated: bool) -> Negotiated {
        let meta_contexts = match self.selection.take() {
            Some((name, contexts)) if name == export.name && self.structured => contexts,
            _ => Vec::new(),
        };
        Negotiated { export, structured_replies: self.structured, meta_contexts, block_sizes_negotiated }
    }
}

/// Appends one option reply.
pub fn option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    out.put_slice(data);
}

fn option_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    option_reply(out, option, reply, message.as_bytes());
}

fn put_string(out: &mut BytesMut, s: &str) {
    out.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.put_slice(s.as_bytes());
}

/// Reads a u32-length-prefixed UTF-8 string of at most [`MAX_NAME_LEN`] bytes.
fn get_string(data: &mut Bytes) -> Option<String> {
    if data.len() < 4 {
        return None;
    }
    let len = usize::try_from(data.get_u32()).ok()?;
    if len > MAX_NAME_LEN || data.len() < len {
        return None;
    }
    String::from_utf8(data.split_to(len).to_vec()).ok()
}

fn parse_info_request(data: &mut Bytes) -> Option<(String, Vec<u16>)> {
    let name = get_string(data)?;
    if data.len() < 2 {
        return None;
    }
    let count = usize::from(data.get_u16());
    if data.len() != count * 2 {
        return None;
    }
    Some((name, (0..count).map(|_| data.get_u16()).collect()))
}

fn parse_meta_request(data: &mut Bytes) -> Option<(String, Vec<MetaQuery>)> {
    let export = get_string(data)?;
    if data.len() < 4 {
        return None;
    }
    let count = data.get_u32();
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(MetaQuery::new(get_string(data)?));
    }
    data.is_empty().then_some((export, queries))
}

#[cfg(test)]
mod tests;
