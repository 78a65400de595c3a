//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable
//! corpus-replay test (`tests/corpus.rs`). Each feeds arbitrary bytes to a
//! decoder in arbitrary splits and checks the invariants that must hold for
//! any input: no panic, progress (no infinite loop), bounded buffering.

use bytes::BytesMut;

use crate::client::ReplyDecoder;
use crate::handshake::{ExportCatalog, ExportInfo, HandshakeConfig, ServerHandshake, Step};
use crate::request::RequestDecoder;
use crate::DecodeError;

/// Splits `data` into chunks whose sizes come from the data itself.
fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    data.chunks(step)
}

/// Request decoder: any bytes, any split.
pub fn decode_request(data: &[u8]) {
    let mut dec = RequestDecoder::new(4096);
    let mut buf = BytesMut::new();
    for chunk in chunks(data) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(_) => assert!(buf.len() < before || before == 0 || buf.len() <= before),
                Err(DecodeError::Incomplete) => break,
                Err(DecodeError::Invalid(_)) => return,
            }
        }
        assert!(buf.len() <= 4096 + 28 + chunk.len(), "decoder buffered beyond its bound");
    }
}

struct OneExport;

impl ExportCatalog for OneExport {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "a/b").then(|| ExportInfo { name: name.into(), description: String::new(), size: 4096, flags: 1 })
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.lookup("a/b").into_iter().collect()
    }
    fn meta_contexts(&self, _: &str) -> Vec<String> {
        vec!["base:allocation".into()]
    }
}

/// Server negotiation: any bytes, any split; output stays proportional to input.
pub fn handshake(data: &[u8]) {
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    for chunk in chunks(data) {
        buf.extend_from_slice(chunk);
        match hs.handle(&mut buf, &OneExport, &mut out) {
            Ok(Step::NeedMore) => {}
            Ok(_) | Err(_) => break,
        }
    }
    assert!(out.len() <= 1024 + data.len() * 64, "reply amplification");
}

/// Client reply decoder: any bytes, any split.
pub fn decode_reply(data: &[u8]) {
    let mut dec = ReplyDecoder::new(4096);
    let mut buf = BytesMut::new();
    for chunk in chunks(data) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf, &|cookie| u32::try_from(cookie % 8192).ok()) {
                Ok(_) => {}
                Err(DecodeError::Incomplete) => break,
                Err(DecodeError::Invalid(_)) => return,
            }
        }
    }
}
