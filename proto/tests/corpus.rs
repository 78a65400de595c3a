//! Replays every committed fuzz corpus file through its target on stable Rust,
//! plus a batch of generated inputs, so CI exercises the fuzz entry points
//! without a nightly toolchain.

use std::path::Path;

use proptest::prelude::*;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus for {target}");
    n
}

#[test]
fn corpora_replay_without_panics() {
    replay("decode_request", proto::fuzzing::decode_request);
    replay("handshake", proto::fuzzing::handshake);
    replay("decode_reply", proto::fuzzing::decode_reply);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn generated_inputs_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        proto::fuzzing::decode_request(&data);
        proto::fuzzing::handshake(&data);
        proto::fuzzing::decode_reply(&data);
    }
}
