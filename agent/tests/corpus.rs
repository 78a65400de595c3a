//! Replays the committed fuzz corpora of `agent/fuzz/` (and a real bitmap
//! file with every single-byte corruption of its header) on stable Rust.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        run(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus {target}");
}

#[test]
fn config_corpus_replays() {
    replay("config_yaml", agent::fuzzing::config_yaml);
}

#[test]
fn bitmap_corpus_replays() {
    replay("bitmap_file", agent::fuzzing::bitmap_file);
}

#[test]
fn every_corrupted_header_byte_is_handled() {
    use agent::bitmap::persist::{BitmapFile, Header};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bitmap");
    let header = Header {
        name: "b".into(),
        granularity: 65536,
        disk_size: 1 << 30,
        generation: 1,
        uuid: [1; 16],
        enabled: true,
        clean: false,
        inconsistent: false,
        image_mtime_ns: 0,
        identity: "x".into(),
    };
    BitmapFile::create(&path, &header, (1u64 << 30) / 65536 / 64).unwrap();
    let good = std::fs::read(&path).unwrap();
    agent::fuzzing::bitmap_file(&good);
    for i in (0..8192).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0xa5;
        agent::fuzzing::bitmap_file(&bad);
        agent::fuzzing::bitmap_file(&bad[..i]);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    #[test]
    fn generated_inputs_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..9000)) {
        agent::fuzzing::config_yaml(&data);
        agent::fuzzing::bitmap_file(&data);
    }
}
