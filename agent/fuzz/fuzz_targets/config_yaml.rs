#![no_main]
//! cargo fuzz run config_yaml (needs nightly); the corpus is replayed on stable by agent/tests/corpus.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| agent::fuzzing::config_yaml(data));
