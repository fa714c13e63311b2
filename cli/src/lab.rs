//! `vipgate lab`: the DESIGN.md topology in network namespaces, built by the embedded
//! netns-scripts so the binary works on its own (no checkout needed).

use crate::args::LabAction;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use tokio::process::Command;

const LIB_SH: &str = include_str!("../../netns-scripts/lib.sh");
const LAB_UP_SH: &str = include_str!("../../netns-scripts/lab-up.sh");
const LAB_DOWN_SH: &str = include_str!("../../netns-scripts/lab-down.sh");

/// The lab's hosts, in the order `status` lists them.
const HOSTS: [&str; 10] = [
    "isp", "inet", "hq", "web", "br", "brpc", "dir1", "dir2", "rs1", "rs2",
];

pub(crate) async fn lab(action: Option<LabAction>, prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty() || prefix.len() > 8 || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("--prefix must be 1-8 letters or digits (namespace names are PREFIX-host)");
    }
    match action {
        Some(LabAction::Up) => up(prefix).await,
        Some(LabAction::Down) => down(prefix).await,
        Some(LabAction::Status) => {
            print!("{}", status(prefix).await);
            Ok(())
        }
        None => {
            up(prefix).await?;
            print!("{}", status(prefix).await);
            println!(
                "\nStep into any host with `ip netns exec {prefix}-inet bash`. Ctrl-C tears the lab down."
            );
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
            down(prefix).await
        }
    }
}

async fn up(prefix: &str) -> anyhow::Result<()> {
    let dir = scripts_dir(prefix)?;
    run_script(&dir.join("lab-up.sh"), prefix).await
}

async fn down(prefix: &str) -> anyhow::Result<()> {
    let dir = scripts_dir(prefix)?;
    run_script(&dir.join("lab-down.sh"), prefix).await?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Writes the embedded scripts where bash can run them (one copy per lab, so labs with
/// different prefixes never race on the files).
fn scripts_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(format!("/run/vipgate-lab/.scripts-{prefix}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [
        ("lib.sh", LIB_SH),
        ("lab-up.sh", LAB_UP_SH),
        ("lab-down.sh", LAB_DOWN_SH),
    ] {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(dir)
}

async fn run_script(script: &Path, prefix: &str) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(script)
        .arg(prefix)
        .status()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} {prefix} failed ({status}); are you root with iproute2 installed?",
            script.display()
        );
    }
    Ok(())
}

async fn status(prefix: &str) -> String {
    let mut out = format!("lab {prefix}:\n");
    for host in HOSTS {
        let ns = format!("{prefix}-{host}");
        if !Path::new("/run/netns").join(&ns).exists() {
            out.push_str(&format!("  {ns:<12} absent\n"));
            continue;
        }
        let addrs = Command::new("ip")
            .args(["-n", &ns, "-4", "-brief", "addr", "show"])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let list: Vec<String> = addrs
            .lines()
            .filter(|l| !l.starts_with("lo "))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let name = f.next()?.split('@').next()?.to_string();
                let ips: Vec<&str> = f.skip(1).collect();
                (!ips.is_empty()).then(|| format!("{name} {}", ips.join(" ")))
            })
            .collect();
        out.push_str(&format!(
            "  {ns:<12} {}\n",
            if list.is_empty() {
                "(switch)".into()
            } else {
                list.join(", ")
            }
        ));
    }
    out
}
