//! Replays every seed of the ssh fuzz targets (fuzz/corpus/ssh_*) on stable, so CI runs the
//! same entry points the fuzzers do without nightly.

use std::path::Path;

fn replay(target: &str, f: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        f(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "no seeds in {}", dir.display());
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
