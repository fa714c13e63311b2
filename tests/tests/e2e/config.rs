//! `vipgate check` as a user runs it: exit codes and FILE:LINE:COL output.

use std::process::Command;
use vipgate_tests::{vipgate_bin, workspace_root};

fn check(text: &str, name: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("vipgate-check-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("site.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(vipgate_bin())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).replace(file.to_str().unwrap(), "site.toml"),
        String::from_utf8_lossy(&out.stderr).replace(file.to_str().unwrap(), "site.toml"),
    )
}

#[test]
fn every_example_passes_check() {
    let dir = workspace_root().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(vipgate_bin())
                .args(["check", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
            n += 1;
        }
    }
    assert!(n >= 1, "no examples found in {}", dir.display());
}

#[test]
fn reference_summary_names_every_part() {
    let text = std::fs::read_to_string(workspace_root().join("examples/reference.toml")).unwrap();
    let (code, out, _) = check(&text, "summary");
    assert_eq!(code, 0, "{out}");
    for part in [
        "daemon",
        "gre      gre-br",
        "nat      overload",
        "service  web",
        "vrrp     vip-web",
        "ssh      ops@",
    ] {
        assert!(out.contains(part), "summary lacks {part:?}:\n{out}");
    }
    assert!(
        out.lines().count() <= 24,
        "summary longer than a screen:\n{out}"
    );
}

#[test]
fn three_mistakes_three_lines_exit_1() {
    let text = std::fs::read_to_string(workspace_root().join("examples/reference.toml"))
        .unwrap()
        .replace("vrid = 51", "vrid = 0")
        .replace("outside_port = 8001", "outside_prot = 8001")
        .replace("\"8585:127.0.0.1:80\"", "\"85x5:127.0.0.1:80\"");
    let (code, out, err) = check(&text, "three");
    assert_eq!(code, 1);
    assert!(out.is_empty(), "diagnostics go to stderr: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.ends_with(" problems")).collect();
    assert_eq!(lines.len(), 3, "{err}");
    let out = err.clone();
    for l in &lines {
        let mut f = l.splitn(4, ':');
        assert_eq!(f.next(), Some("site.toml"));
        assert!(f.next().unwrap().parse::<u32>().is_ok(), "{l}");
        assert!(f.next().unwrap().parse::<u32>().is_ok(), "{l}");
    }
    assert!(out.contains("did you mean `outside_port`"), "{out}");
    assert!(out.contains("vrid 0 is out of range"), "{out}");
    assert!(
        out.contains("bad local forwarding specification '85x5:127.0.0.1:80'"),
        "{out}"
    );
    assert!(err.contains("3 problems"));
}

#[test]
fn hostile_files_never_panic() {
    for (name, text) in [
        ("binary", "\u{0}\u{1}\u{2}PNG\r\n"),
        ("empty", ""),
        ("unknown", "[teleport]\nto = \"mars\"\n"),
        ("yaml", "gre:\n  - name: x\n"),
    ] {
        let (code, out, err) = check(text, name);
        assert_eq!(code, 1, "{name}: {out}{err}");
        assert!(err.starts_with("site.toml:"), "{name}: {out}{err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(vipgate_bin())
        .args(["check", "-c", "/nonexistent/site.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn status_without_daemon_explains() {
    let out = Command::new(vipgate_bin())
        .args(["status", "--control", "/nonexistent/vipgate.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no vipgate daemon answers on /nonexistent/vipgate.sock"),
        "{err}"
    );
}

#[test]
fn completions_and_man_pages() {
    let out = Command::new(vipgate_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("vipgate"));
    let dir = std::env::temp_dir().join(format!("vipgate-man-{}", std::process::id()));
    let out = Command::new(vipgate_bin())
        .args(["man", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.join("vipgate.1").exists() && dir.join("vipgate-check.1").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quiet_prints_nothing_and_dump_reparses() {
    let bad = "[[vrrp]]\nname = \"v\"\ninterface = \"eth0\"\nvrid = 300\npriorty = 1\naddresses = [\"10.0.0.1/24\"]\n";
    let dir = std::env::temp_dir().join(format!("vipgate-check-{}-quiet", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("site.toml");
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(vipgate_bin())
        .args(["check", "-q", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    let dump = Command::new(vipgate_bin())
        .args(["check", "--dump", "-c"])
        .arg(workspace_root().join("examples/reference.toml"))
        .output()
        .unwrap();
    assert!(dump.status.success());
    let (code, out, err) = check(&String::from_utf8_lossy(&dump.stdout), "dump");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(": OK"), "{out}");
}
