#![no_main]
//! cargo fuzz run decode_reply (needs nightly); the corpus is replayed on stable by proto/tests/corpus.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto::fuzzing::decode_reply(data));
