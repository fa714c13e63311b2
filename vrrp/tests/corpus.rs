//! Replays the cargo-fuzz corpora of `vrrp_advert` and `vrrp_instance` on stable, so CI
//! exercises them.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8]), at_least: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        check(&data);
        n += 1;
    }
    assert!(n >= at_least, "{target} corpus has only {n} files");
}

#[test]
fn replay_fuzz_corpus() {
    replay("vrrp_advert", vrrp::fuzzing::check_advert, 5);
}

#[test]
fn replay_instance_fuzz_corpus() {
    replay("vrrp_instance", vrrp::fuzzing::check_instance, 5);
}
