//! Replays every seed of the ssh fuzz targets (fuzz/corpus/ssh_*) on stable, so CI runs the
//! same entry points the fuzzers do without nightly.

fn replay(target: &str, f: impl Fn(&[u8])) {
    let n = testkit::replay_corpus(target, f);
    assert!(n > 0, "no seeds in the {target} corpus");
}

fn text(f: fn(&str)) -> impl Fn(&[u8]) {
    move |d| {
        if let Ok(t) = std::str::from_utf8(d) {
            f(t);
        }
    }
}

#[test]
fn corpus_replays() {
    replay("ssh_spec", text(sshfwd::fuzzing::spec_parse));
    replay("ssh_options", text(sshfwd::fuzzing::options_parse));
    replay("ssh_known_hosts", text(sshfwd::fuzzing::known_hosts_check));
    replay(
        "ssh_authorized_keys",
        text(sshfwd::fuzzing::authorized_keys_parse),
    );
    replay("ssh_socks", sshfwd::fuzzing::socks_parse);
    replay("ssh_auth_policy", text(sshfwd::fuzzing::auth_policy));
}
