//! The shipped objects (kpath.o, gre.o) are the builds of the shipped sources.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

fn bpf_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bpf"))
}

#[test]
fn recorded_source_hashes_match_the_sources() {
    let recorded = std::fs::read_to_string(bpf_dir().join("sources.sha256")).unwrap();
    let mut files = 0;
    for line in recorded.lines() {
        let (hash, name) = line.split_once("  ").expect("sha256sum format");
        let text = std::fs::read(bpf_dir().join(name)).unwrap();
        let actual: String = Sha256::digest(&text)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            actual, hash,
            "{name} changed since the objects were built: run kpath/bpf/build.sh and commit them"
        );
        files += 1;
    }
    assert_eq!(files, 3, "kpath.c, gre.c and build.sh are recorded");
}

#[test]
fn rebuilding_gives_the_shipped_object_where_clang_is_present() {
    let have_clang = Command::new("clang").arg("--version").output().is_ok();
    if !have_clang {
        eprintln!("clang absent: only the recorded hashes are checked");
        return;
    }
    let out = std::env::temp_dir().join(format!("kpath-rebuild-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let status = Command::new("sh")
        .arg(bpf_dir().join("build.sh"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "build.sh failed");
    for (name, shipped) in [("kpath.o", kpath::OBJECT), ("gre.o", kpath::GRE_OBJECT)] {
        let rebuilt = std::fs::read(out.join(name)).unwrap();
        assert!(
            rebuilt == shipped,
            "{name} is not the build of its source: run kpath/bpf/build.sh and commit {name}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
