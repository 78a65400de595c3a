#![allow(clippy::cast_possible_truncation)] // test data sizes are small
use super::*;
use crate::consts::{tflags, BASE_ALLOCATION};
use proptest::prelude::*;

struct Fixed;

impl ExportCatalog for Fixed {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "vm1/disk0").then(|| ExportInfo {
            name: name.into(),
            description: "test disk".into(),
            size: 1 << 20,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
        })
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.lookup("vm1/disk0").into_iter().collect()
    }
    fn meta_contexts(&self, _: &str) -> Vec<String> {
        vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:backup".into()]
    }
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(code);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.to_vec()
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_string(&mut b, name);
    b.put_u16(infos.len() as u16);
    infos.iter().for_each(|i| b.put_u16(*i));
    b.to_vec()
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_string(&mut b, name);
    b.put_u32(queries.len() as u32);
    queries.iter().for_each(|q| put_string(&mut b, q));
    b.to_vec()
}

/// Parses option replies: (option, reply type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(out.get_u64(), OPTION_REPLY_MAGIC);
        let (o, t, l) = (out.get_u32(), out.get_u32(), out.get_u32() as usize);
        v.push((o, t, out[..l].to_vec()));
        out.advance(l);
    }
    v
}

fn run(cfg: HandshakeConfig, input: &[u8]) -> (Result<Step, HandshakeError>, Vec<u8>) {
    let mut hs = ServerHandshake::new(cfg);
    let mut buf = BytesMut::from(input);
    let mut out = BytesMut::new();
    let step = hs.handle(&mut buf, &Fixed, &mut out);
    (step, out.to_vec())
}

fn flags() -> Vec<u8> {
    (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes().to_vec()
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let mut out = BytesMut::new();
    ServerHandshake::new(HandshakeConfig::default()).greeting(&mut out);
    assert_eq!(&out[..8], b"NBDMAGIC");
    assert_eq!(&out[8..16], b"IHAVEOPT");
    assert_eq!(&out[16..], &[0, 3]);
}

#[test]
fn go_with_structured_replies_and_meta_context() {
    let mut input = flags();
    input.extend(option(opt::STRUCTURED_REPLY, &[]));
    input.extend(option(opt::SET_META_CONTEXT, &meta_data("vm1/disk0", &["base:allocation", "qemu:nope"])));
    input.extend(option(opt::GO, &info_data("vm1/disk0", &[info::BLOCK_SIZE, info::NAME])));
    let (step, out) = run(HandshakeConfig::default(), &input);
    let Ok(Step::Done(n)) = step else { panic!("{step:?}") };
    assert!(n.structured_replies && n.block_sizes_negotiated);
    assert_eq!(n.meta_contexts, vec![MetaContext { id: 1, name: BASE_ALLOCATION.into() }]);
    let types: Vec<(u32, u32)> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        types,
        vec![
            (opt::STRUCTURED_REPLY, rep::ACK),
            (opt::SET_META_CONTEXT, rep::META_CONTEXT),
            (opt::SET_META_CONTEXT, rep::ACK),
            (opt::GO, rep::INFO),
            (opt::GO, rep::INFO),
            (opt::GO, rep::INFO),
            (opt::GO, rep::ACK),
        ]
    );
    let export = &replies(&out)[3].2;
    assert_eq!(export[..2], info::EXPORT.to_be_bytes());
    assert_eq!(u64::from_be_bytes(export[2..10].try_into().unwrap()), 1 << 20);
}

#[test]
fn byte_at_a_time_gives_the_same_result() {
    let mut input = flags();
    input.extend(option(opt::LIST, &[]));
    input.extend(option(opt::GO, &info_data("vm1/disk0", &[])));
    let (whole, whole_out) = run(HandshakeConfig::default(), &input);
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    let mut last = Ok(Step::NeedMore);
    for b in input {
        buf.put_u8(b);
        last = hs.handle(&mut buf, &Fixed, &mut out);
    }
    assert_eq!(last, whole);
    assert_eq!(out.to_vec(), whole_out);
}

#[test]
fn unknown_export_and_bad_options_get_errors_and_negotiation_continues() {
    let mut input = flags();
    input.extend(option(opt::INFO, &info_data("nope", &[])));
    input.extend(option(opt::GO, &[1, 2, 3]));
    input.extend(option(99, &[]));
    input.extend(option(opt::STARTTLS, &[]));
    input.extend(option(opt::SET_META_CONTEXT, &meta_data("vm1/disk0", &["base:allocation"])));
    input.extend(option(opt::LIST, &[0]));
    let (step, out) = run(HandshakeConfig::default(), &input);
    assert_eq!(step, Ok(Step::NeedMore));
    let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        types,
        vec![rep::ERR_UNKNOWN, rep::ERR_INVALID, rep::ERR_UNSUP, rep::ERR_POLICY, rep::ERR_INVALID, rep::ERR_INVALID]
    );
}

#[test]
fn list_meta_context_supports_namespace_queries() {
    let mut input = flags();
    input.extend(option(opt::LIST_META_CONTEXT, &meta_data("vm1/disk0", &["qemu:dirty-bitmap:"])));
    input.extend(option(opt::LIST_META_CONTEXT, &meta_data("vm1/disk0", &[])));
    let (_, out) = run(HandshakeConfig::default(), &input);
    let names: Vec<String> = replies(&out)
        .iter()
        .filter(|r| r.1 == rep::META_CONTEXT)
        .map(|r| String::from_utf8(r.2[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, ["qemu:dirty-bitmap:backup", "base:allocation", "qemu:dirty-bitmap:backup"]);
}

#[test]
fn export_name_sends_size_flags_and_optional_zeroes() {
    let mut input = client_flags::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend(option(opt::EXPORT_NAME, b"vm1/disk0"));
    let (step, out) = run(HandshakeConfig::default(), &input);
    assert!(matches!(step, Ok(Step::Done(_))));
    assert_eq!(out.len(), 8 + 2 + 124);
    let mut input = client_flags::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend(option(opt::EXPORT_NAME, b"other"));
    assert_eq!(run(HandshakeConfig::default(), &input).0, Err(HandshakeError::UnknownExport("other".into())));
}

#[test]
fn tls_required_refuses_everything_but_starttls_and_abort() {
    let cfg = HandshakeConfig { tls: TlsPolicy::Required, ..HandshakeConfig::default() };
    let mut input = flags();
    input.extend(option(opt::LIST, &[]));
    input.extend(option(opt::GO, &info_data("vm1/disk0", &[])));
    input.extend(option(opt::STARTTLS, &[]));
    let (step, out) = run(cfg, &input);
    assert_eq!(step, Ok(Step::StartTls));
    let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(types, vec![rep::ERR_TLS_REQD, rep::ERR_TLS_REQD, rep::ACK]);
    let mut input = flags();
    input.extend(option(opt::EXPORT_NAME, b"vm1/disk0"));
    assert_eq!(run(cfg, &input).0, Err(HandshakeError::TlsRequired));
}

#[test]
fn stream_level_violations_end_the_connection() {
    assert_eq!(run(HandshakeConfig::default(), &[0, 0, 0, 0]).0, Err(HandshakeError::NotFixedNewstyle));
    let mut input = flags();
    input.extend(option(opt::LIST, &vec![0; 70_000]));
    assert_eq!(run(HandshakeConfig::default(), &input).0, Err(HandshakeError::OptionTooLong(70_000)));
    let cfg = HandshakeConfig { max_options: 3, ..HandshakeConfig::default() };
    let mut input = flags();
    (0..4).for_each(|_| input.extend(option(99, &[])));
    assert_eq!(run(cfg, &input).0, Err(HandshakeError::TooManyOptions));
    let mut input = flags();
    input.extend([0u8; 16]);
    assert_eq!(run(HandshakeConfig::default(), &input).0, Err(HandshakeError::Invalid("option magic")));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(prefix_ok: bool, bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = if prefix_ok { flags() } else { vec![] };
        input.extend(bytes);
        let _ = run(HandshakeConfig::default(), &input);
    }

    #[test]
    fn arbitrary_options_never_panic(opts in proptest::collection::vec((0u32..16, proptest::collection::vec(any::<u8>(), 0..64)), 0..8)) {
        let mut input = flags();
        for (code, data) in opts {
            input.extend(option(code, &data));
        }
        let _ = run(HandshakeConfig::default(), &input);
    }
}

/// A catalog whose export admits one client: the second is refused.
struct Full(std::cell::Cell<u32>);

impl ExportCatalog for Full {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        Fixed.lookup(name)
    }
    fn list(&self) -> Vec<ExportInfo> {
        Fixed.list()
    }
    fn meta_contexts(&self, export: &str) -> Vec<String> {
        Fixed.meta_contexts(export)
    }
    fn admit(&self, export: &str) -> Result<(), (u32, String)> {
        self.0.set(self.0.get() + 1);
        Err((rep::ERR_POLICY, format!("{export} is full")))
    }
}

#[test]
fn a_refused_admission_fails_go_but_not_info_and_ends_export_name() {
    let catalog = Full(std::cell::Cell::new(0));
    let mut input = flags();
    input.extend(option(opt::INFO, &info_data("vm1/disk0", &[])));
    input.extend(option(opt::GO, &info_data("vm1/disk0", &[])));
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let (mut buf, mut out) = (BytesMut::from(&input[..]), BytesMut::new());
    let step = hs.handle(&mut buf, &catalog, &mut out).unwrap();
    assert!(matches!(step, Step::NeedMore), "a refused GO leaves the client negotiating");
    let got: Vec<(u32, u32)> = replies(&out).into_iter().map(|(o, r, _)| (o, r)).collect();
    assert_eq!(got.first(), Some(&(opt::INFO, rep::INFO)), "INFO does not ask for admission");
    assert_eq!(got.last(), Some(&(opt::GO, rep::ERR_POLICY)), "{got:?}");
    assert_eq!(got.iter().filter(|(o, _)| *o == opt::GO).count(), 1, "no INFO replies before the refusal");
    assert!(replies(&out).last().unwrap().2.ends_with(b"vm1/disk0 is full"));
    assert_eq!(catalog.0.get(), 1);

    let mut input = flags();
    input.extend(option(opt::EXPORT_NAME, b"vm1/disk0"));
    let mut hs = ServerHandshake::new(HandshakeConfig::default());
    let (mut buf, mut out) = (BytesMut::from(&input[..]), BytesMut::new());
    let err = hs.handle(&mut buf, &catalog, &mut out).unwrap_err();
    assert!(matches!(err, HandshakeError::Refused(ref name, _) if name == "vm1/disk0"), "{err:?}");
    assert!(out.is_empty(), "EXPORT_NAME has no error reply: nothing is sent");
}
