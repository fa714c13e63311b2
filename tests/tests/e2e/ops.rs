//! Operating the daemon the way systemd runs it: logs in journald's native protocol when
//! stderr is the journal, plain uncoloured lines otherwise.
//!
//! No systemd-journald runs here, so the test plays journald: a datagram socket of its own is
//! bind-mounted over `/run/systemd/journal/socket` in a private mount namespace (`unshare`),
//! and stderr is named in `JOURNAL_STREAM` the way systemd does for a unit.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};
use vipgate_tests::{Proc, Topology, e2e, vipgate_bin, wait_until};

/// One entry of journald's native protocol: `KEY=VALUE\n`, or `KEY\n` + 64-bit little-endian
/// length + value + `\n` for values that may hold newlines.
fn parse_entry(mut bytes: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    while let Some(nl) = bytes.iter().position(|&c| c == b'\n') {
        let line = &bytes[..nl];
        let (key, value, rest) = match line.iter().position(|&c| c == b'=') {
            Some(eq) => (&line[..eq], &line[eq + 1..], &bytes[nl + 1..]),
            None => {
                let len_bytes: [u8; 8] = bytes[nl + 1..nl + 9].try_into().expect("length");
                let len = usize::try_from(u64::from_le_bytes(len_bytes)).expect("length");
                let value = &bytes[nl + 9..nl + 9 + len];
                assert_eq!(
                    bytes[nl + 9 + len],
                    b'\n',
                    "a binary field ends in a newline"
                );
                (line, value, &bytes[nl + 9 + len + 1..])
            }
        };
        fields.insert(
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
        bytes = rest;
    }
    assert!(bytes.is_empty(), "trailing bytes without a newline");
    fields
}

/// Receives entries until one whose MESSAGE contains `needle` (panics after `timeout`).
fn entry_with(
    journal: &UnixDatagram,
    seen: &mut Vec<HashMap<String, String>>,
    needle: &str,
    timeout: Duration,
) -> HashMap<String, String> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(e) = seen
            .iter()
            .find(|e| e.get("MESSAGE").is_some_and(|m| m.contains(needle)))
        {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no journal entry with {needle:?} in {timeout:?}; got {seen:#?}"
        );
        match journal.recv(&mut buf) {
            // The empty datagram is the layer's check that journald listens.
            Ok(0) => {}
            Ok(n) => seen.push(parse_entry(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("journal socket: {e}"),
        }
    }
}

/// A site with only the forwarding SSH server on loopback, run as root without dropping
/// privileges (which vipgate warns about: a WARN line to look for).
fn site(t: &Topology) -> String {
    std::fs::write(t.dir().join("ak"), "").unwrap();
    let cfg = t.write(
        "site.toml",
        &format!(
            "[daemon]\ncontrol = \"{dir}/ctl.sock\"\ndrop_privileges = false\n\n\
             [sshd]\nlisten = \"127.0.0.1:2222\"\nhost_key = \"{dir}/hk\"\nauthorized_keys = \"{dir}/ak\"\n",
            dir = t.dir().display()
        ),
    );
    cfg.to_str().unwrap().to_owned()
}

/// `vipgate ARGS` as systemd would start it with stderr on the journal: in a private mount
/// namespace whose `/run/systemd/journal/socket` is `journal`, with `JOURNAL_STREAM` naming
/// its stderr (the process log).
fn under_journal(t: &Topology, name: &str, journal: &Path, args: &[&str]) -> Proc {
    let script = format!(
        "set -e\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/systemd/journal\n\
         touch /run/systemd/journal/socket\n\
         mount --bind {journal} /run/systemd/journal/socket\n\
         JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2)\n\
         export JOURNAL_STREAM\n\
         exec {bin} \"$@\"\n",
        journal = journal.display(),
        bin = vipgate_bin().display(),
    );
    let mut argv = vec![
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ];
    argv.extend_from_slice(args);
    t.spawn("h", name, &argv)
}

#[test]
fn logs_reach_journald_natively_with_priorities_and_fields() {
    let mut t = e2e!();
    t.host("h");
    let cfg = site(&t);
    let journal_path = t.dir().join("journal.sock");
    let journal = UnixDatagram::bind(&journal_path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let mut daemon = under_journal(&t, "journald", &journal_path, &["run", "-c", &cfg]);
    let mut seen = Vec::new();
    let warning = entry_with(
        &journal,
        &mut seen,
        "drop_privileges = false",
        Duration::from_secs(20),
    );
    assert_eq!(warning["PRIORITY"], "4", "WARN is warning(4): {warning:?}");
    assert_eq!(warning["SYSLOG_IDENTIFIER"], "vipgate", "{warning:?}");
    let running = entry_with(
        &journal,
        &mut seen,
        "vipgate running",
        Duration::from_secs(20),
    );
    assert_eq!(running["PRIORITY"], "6", "INFO is info(6): {running:?}");
    assert_eq!(running["VIPGATE_CONFIG"], cfg, "fields are journal fields");
    assert_eq!(running["VIPGATE_PARTS"], "1", "{running:?}");
    assert!(
        running["MESSAGE"] == "vipgate running",
        "the message alone, no level or timestamp prefix: {running:?}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
    entry_with(&journal, &mut seen, "SIGTERM", Duration::from_secs(5));
    let stderr = daemon.log();
    assert!(
        !stderr.contains("vipgate running"),
        "lines sent to the journal are not written to stderr again: {stderr}"
    );

    // --log-format json stays JSON on stderr even there.
    let mut json = under_journal(
        &t,
        "json",
        &journal_path,
        &["--log-format", "json", "run", "-c", &cfg],
    );
    wait_until(Duration::from_secs(20), "JSON lines on stderr", || {
        json.log().contains("vipgate running")
    });
    assert_eq!(json.terminate(Duration::from_secs(10)), Some(0));
    let log = json.log();
    let line = log.lines().find(|l| l.contains("vipgate running")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "INFO", "{line}");

    // Without JOURNAL_STREAM stderr (a file here) gets plain lines: no colour codes.
    let mut plain = t.vipgate("h", "plain", &["run", "-c", &cfg]);
    wait_until(Duration::from_secs(20), "log lines on stderr", || {
        plain.log().contains("vipgate running")
    });
    assert_eq!(plain.terminate(Duration::from_secs(10)), Some(0));
    let log = plain.log();
    assert!(log.contains("WARN"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a file: {log:?}"
    );
}

/// `dist/deb.sh` packages the built binary; the package lists what a Debian admin expects,
/// unpacks into a scratch root, its unit passes `systemd-analyze verify`, and the packaged
/// `vipgate check` accepts the shipped conffile. Needs no namespace: dpkg-deb and a folder.
#[test]
fn the_debian_package_holds_unit_pages_completions_and_a_valid_conffile() {
    let dir = std::env::temp_dir().join(format!("vipgate-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("running a packaging tool");
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let built = run(std::process::Command::new(
        vipgate_tests::workspace_root().join("dist/deb.sh"),
    )
    .arg("--binary")
    .arg(vipgate_bin())
    .arg("--out")
    .arg(&dir));
    let deb = built.lines().last().unwrap().to_owned();

    let info = run(std::process::Command::new("dpkg-deb").args(["-I", &deb]));
    for field in ["Package: vipgate", "Depends: libc6", "Section: net"] {
        assert!(info.contains(field), "{field}: {info}");
    }
    for member in ["postinst", "conffiles"] {
        assert!(info.contains(member), "{member}: {info}");
    }
    let contents = run(std::process::Command::new("dpkg-deb").args(["-c", &deb]));
    for path in [
        "./usr/bin/vipgate",
        "./lib/systemd/system/vipgate.service",
        "./etc/vipgate/vipgate.toml",
        "./usr/share/man/man1/vipgate.1.gz",
        "./usr/share/man/man1/vipgate-lb-weight.1.gz",
        "./usr/share/man/man1/vipgate-lb-add-backend.1.gz",
        "./usr/share/man/man1/vipgate-lb-remove-backend.1.gz",
        "./usr/share/man/man1/vipgate-lb-set-state.1.gz",
        "./usr/share/man/man1/vipgate-nat-clear.1.gz",
        "./usr/share/man/man5/vipgate.toml.5.gz",
        "./usr/share/bash-completion/completions/vipgate",
        "./usr/share/zsh/vendor-completions/_vipgate",
        "./usr/share/fish/vendor_completions.d/vipgate.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    let conffiles = run(std::process::Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]));
    assert_eq!(conffiles.trim(), "/etc/vipgate/vipgate.toml");

    let root = dir.join("root");
    run(std::process::Command::new("dpkg-deb")
        .args(["-x", &deb])
        .arg(&root));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/vipgate.service")).unwrap();
    for line in [
        "ExecStartPre=/usr/bin/vipgate check -q -c /etc/vipgate/vipgate.toml",
        "StateDirectory=vipgate",
        "LimitNOFILE=65536",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_BPF",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}:\n{unit}");
    }
    // verify checks that ExecStart's program exists: point the unit at the unpacked one (the
    // host has no vipgate installed), and at no man page for the same reason.
    let scratch_unit = dir.join("vipgate.service");
    let bin = root.join("usr/bin/vipgate");
    std::fs::write(
        &scratch_unit,
        unit.replace("/usr/bin/vipgate", bin.to_str().unwrap()),
    )
    .unwrap();
    run(std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&scratch_unit));
    let checked = run(std::process::Command::new(root.join("usr/bin/vipgate"))
        .args(["check", "-c"])
        .arg(root.join("etc/vipgate/vipgate.toml")));
    assert!(checked.contains(": OK"), "{checked}");
    let man5 = run(std::process::Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {}",
        root.join("usr/share/man/man5/vipgate.toml.5.gz").display()
    )));
    assert!(
        man5.contains("[[vrrp_group]]") && man5.contains("vrid = 51"),
        "{man5}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
