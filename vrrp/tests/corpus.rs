//! Replays the cargo-fuzz corpora of `vrrp_advert` and `vrrp_instance` on stable, so CI
//! exercises them.

use testkit::replay_corpus;

#[test]
fn replay_fuzz_corpus() {
    let n = replay_corpus("vrrp_advert", vrrp::fuzzing::check_advert);
    assert!(n >= 5, "vrrp_advert corpus has only {n} files");
}

#[test]
fn replay_instance_fuzz_corpus() {
    let n = replay_corpus("vrrp_instance", vrrp::fuzzing::check_instance);
    assert!(n >= 5, "vrrp_instance corpus has only {n} files");
}
