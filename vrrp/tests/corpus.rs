//! Replays the cargo-fuzz corpus of `vrrp_advert` on stable, so CI exercises it.

use std::path::Path;

#[test]
fn replay_fuzz_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vrrp_advert");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        vrrp::fuzzing::check_advert(&data);
        n += 1;
    }
    assert!(n >= 5, "corpus has only {n} files");
}
