//! Replays every file of the fuzz corpora on stable, so CI runs the fuzz targets' inputs
//! without nightly or libFuzzer.

fn replay(target: &str, f: impl Fn(&str)) {
    let n = testkit::replay_corpus(target, |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            f(text);
        }
    });
    assert!(n > 0, "empty {target} corpus");
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", vipgate::fuzzing::config_parse);
}

#[test]
fn duration_parse_corpus() {
    replay("duration_parse", vipgate::fuzzing::duration_parse);
}
