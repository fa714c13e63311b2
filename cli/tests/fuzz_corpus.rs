//! Replays every file of the fuzz corpora on stable, so CI runs the fuzz targets' inputs
//! without nightly or libFuzzer.

use std::path::Path;

fn replay(target: &str, f: impl Fn(&str)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            f(text);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", vipgate::fuzzing::config_parse);
}

#[test]
fn duration_parse_corpus() {
    replay("duration_parse", vipgate::fuzzing::duration_parse);
}
