//! Entry points shared by the cargo-fuzz targets in `agent/fuzz/` and the
//! stable corpus replay in `agent/tests/corpus.rs`: any input must give a
//! value or an error, never a panic or a hang.

use std::io::Write;

/// The YAML config loaders (agent file and VM file).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = std::path::Path::new("/fuzz/agent.yaml");
    if let Ok(config) = crate::config::AgentConfig::from_str(text, source) {
        let _ = config.node.len();
    }
    let _ = crate::config::VmConfig::from_str(text, source);
}

/// The bitmap file loader, on a file holding `data`.
pub fn bitmap_file(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else { return };
    if file.write_all(data).is_err() {
        return;
    }
    if let Ok((_, header, body)) = crate::bitmap::persist::BitmapFile::open(file.path()) {
        let words = header.disk_size.div_ceil(header.granularity).div_ceil(64);
        assert_eq!(body.len() as u64, words, "loader returned a body of the wrong size");
    }
}
