//! Protocol edge cases over raw sockets, where no well-behaved client goes:
//! unknown commands, pipelining with out-of-order completion, malformed
//! negotiation, oversized writes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use proto::client::{ReplyDecoder, ReplyEvent};
use proto::consts::{errno, opt, IHAVEOPT};
use proto::{Command, Request};
use tests::{Agent, AgentBuilder};

/// Negotiates with GO (no structured replies) on the Unix socket.
fn connect(agent: &Agent, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(agent.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut out = BytesMut::new();
    out.put_u32(3);
    out.put_u64(IHAVEOPT);
    out.put_u32(opt::GO);
    out.put_u32(4 + export.len() as u32 + 2);
    out.put_u32(export.len() as u32);
    out.put_slice(export.as_bytes());
    out.put_u16(0);
    s.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let ty = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        assert!(ty & (1 << 31) == 0, "option error {ty:#x}: {}", String::from_utf8_lossy(&body));
        if ty == proto::consts::rep::ACK {
            return s;
        }
    }
}

fn send(s: &mut UnixStream, command: Command, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
    let mut out = BytesMut::new();
    Request { cookie, command, flags: 0, offset, length }.encode(&mut out);
    out.put_slice(payload);
    s.write_all(&out).unwrap();
}

fn replies(s: &mut UnixStream, n: usize, read_len: &dyn Fn(u64) -> Option<u32>) -> Vec<ReplyEvent> {
    let mut dec = ReplyDecoder::new(64 << 20);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < n {
        match dec.decode(&mut buf, read_len) {
            Ok(ev) => got.push(ev),
            Err(proto::DecodeError::Incomplete) => {
                let mut chunk = [0u8; 65536];
                let k = s.read(&mut chunk).unwrap();
                assert!(k > 0, "server closed the connection");
                buf.extend_from_slice(&chunk[..k]);
            }
            Err(e) => panic!("{e}"),
        }
    }
    got
}

fn errno_of(ev: &ReplyEvent) -> u32 {
    match ev {
        ReplyEvent::Simple { errno, .. } => *errno,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_commands_and_bad_ranges_get_errors_and_the_connection_survives() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    let mut s = connect(&agent, "vm1/disk0");
    send(&mut s, Command::Unknown(42), 1, 0, 512, &[]);
    send(&mut s, Command::Read, 2, u64::MAX - 100, 512, &[]);
    send(&mut s, Command::BlockStatus, 3, 0, 4096, &[]);
    let got = replies(&mut s, 3, &|_| None);
    let by_cookie = |c: u64| errno_of(got.iter().find(|e| e.cookie() == c).unwrap());
    assert_eq!(by_cookie(1), errno::EINVAL);
    assert_eq!(by_cookie(2), errno::EINVAL);
    assert_eq!(by_cookie(3), errno::EINVAL, "BLOCK_STATUS without a negotiated context");
    send(&mut s, Command::Write, 4, 0, 4, b"abcd");
    send(&mut s, Command::Read, 5, 0, 4, &[]);
    let got = replies(&mut s, 2, &|c| (c == 5).then_some(4));
    assert!(
        got.contains(&ReplyEvent::Simple { cookie: 5, errno: 0, data: bytes::Bytes::from_static(b"abcd") }),
        "{got:?}"
    );
}

#[test]
fn oversized_write_is_refused_with_eoverflow_and_stream_stays_in_sync() {
    let agent = AgentBuilder::new().simple_vm("vm1", "64MiB").start().unwrap();
    let mut s = connect(&agent, "vm1/disk0");
    let big = vec![0x5au8; (32 << 20) + 512];
    send(&mut s, Command::Write, 7, 0, big.len() as u32, &big);
    send(&mut s, Command::Read, 8, 0, 512, &[]);
    let got = replies(&mut s, 2, &|c| (c == 8).then_some(512));
    assert_eq!(errno_of(&got[0]), errno::EOVERFLOW);
    assert_eq!(got[1].cookie(), 8);
}

#[test]
fn pipelined_requests_all_complete_with_their_own_data() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start().unwrap();
    let mut s = connect(&agent, "vm1/disk0");
    for i in 0..64u64 {
        send(&mut s, Command::Write, i, i * 4096, 4096, &[i as u8; 4096]);
    }
    let writes = replies(&mut s, 64, &|_| None);
    let mut cookies: Vec<u64> = writes.iter().map(|e| e.cookie()).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..64).collect::<Vec<_>>());
    for i in 0..64u64 {
        send(&mut s, Command::Read, 100 + i, i * 4096, 4096, &[]);
    }
    for ev in replies(&mut s, 64, &|_| Some(4096)) {
        let ReplyEvent::Simple { cookie, errno: 0, data } = ev else { panic!("{ev:?}") };
        assert!(data.iter().all(|&b| u64::from(b) == cookie - 100), "cookie {cookie}");
    }
}

#[test]
fn malformed_negotiation_closes_only_that_connection() {
    let agent = AgentBuilder::new().simple_vm("vm1", "1MiB").start().unwrap();
    let mut good = connect(&agent, "vm1/disk0");
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0u8; 40][..],
        &[0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
    ] {
        let mut bad = UnixStream::connect(agent.socket()).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        bad.read_exact(&mut greeting).unwrap();
        bad.write_all(garbage).unwrap();
        let mut rest = Vec::new();
        let _ = bad.read_to_end(&mut rest); // server closes (EOF or reset), never hangs
    }
    send(&mut good, Command::Write, 1, 0, 3, b"yes");
    send(&mut good, Command::Read, 2, 0, 3, &[]);
    let got = replies(&mut good, 2, &|c| (c == 2).then_some(3));
    assert!(got.iter().any(|e| matches!(e, ReplyEvent::Simple { cookie: 2, data, .. } if &data[..] == b"yes")));
}

#[test]
fn disconnect_waits_for_in_flight_writes() {
    let agent = AgentBuilder::new().simple_vm("vm1", "16MiB").start().unwrap();
    let mut s = connect(&agent, "vm1/disk0");
    let data = vec![0x77u8; 1 << 20];
    for i in 0..8u64 {
        send(&mut s, Command::Write, i, i << 20, 1 << 20, &data);
    }
    send(&mut s, Command::Disc, 99, 0, 0, &[]);
    let got = replies(&mut s, 8, &|_| None);
    assert!(got.iter().all(|e| errno_of(e) == 0));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let mut s = connect(&agent, "vm1/disk0");
    send(&mut s, Command::Read, 1, 7 << 20, 4096, &[]);
    let ReplyEvent::Simple { data, .. } = &replies(&mut s, 1, &|_| Some(4096))[0] else { panic!() };
    assert!(data.iter().all(|&b| b == 0x77));
}
