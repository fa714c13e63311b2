//! `vipgate lab`: the DESIGN.md topology in network namespaces, with vipgate running on the
//! routers and directors from embedded configs, and a scripted tour that proves each user
//! scenario. The binary carries the netns-scripts and configs, so it works without a checkout.

use crate::args::LabAction;
use anyhow::{Context, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};

const LIB_SH: &str = include_str!("../../netns-scripts/lib.sh");
const LAB_UP_SH: &str = include_str!("../../netns-scripts/lab-up.sh");
const LAB_DOWN_SH: &str = include_str!("../../netns-scripts/lab-down.sh");

/// The lab's hosts, in the order `status` lists them.
const HOSTS: [&str; 10] = [
    "isp", "inet", "hq", "web", "br", "brpc", "dir1", "dir2", "rs1", "rs2",
];

/// Where vipgate runs in the lab, with its embedded config (`@STATE@` = the lab's state dir).
const DAEMONS: [(&str, &str); 4] = [
    ("hq", include_str!("../../netns-scripts/lab/hq.toml")),
    ("br", include_str!("../../netns-scripts/lab/br.toml")),
    ("dir1", include_str!("../../netns-scripts/lab/dir1.toml")),
    ("dir2", include_str!("../../netns-scripts/lab/dir2.toml")),
];

pub(crate) async fn lab(action: Option<LabAction>, prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty() || prefix.len() > 8 || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("--prefix must be 1-8 letters or digits (namespace names are PREFIX-host)");
    }
    let lab = Lab {
        prefix: prefix.to_string(),
    };
    match action {
        Some(LabAction::Up) => lab.up().await,
        Some(LabAction::Down) => lab.down().await,
        Some(LabAction::Status) => {
            print!("{}", lab.status().await);
            Ok(())
        }
        Some(LabAction::Tour) => {
            let failed = lab.tour().await;
            if failed > 0 {
                bail!(
                    "{failed} tour step(s) failed; logs are in {}",
                    lab.state().display()
                );
            }
            Ok(())
        }
        None => {
            lab.up().await?;
            let failed = lab.tour().await;
            println!(
                "\n{}. Step into any host with `ip netns exec {prefix}-inet bash`; daemons log to {}.\nLive status follows; Ctrl-C (or SIGTERM, SIGHUP) tears the lab down.",
                if failed == 0 {
                    "Every scenario works".to_string()
                } else {
                    format!("{failed} step(s) failed")
                },
                lab.state().display()
            );
            let live = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    // Clear the screen and redraw, like `watch`.
                    print!("\x1b[2J\x1b[H{}", lab.live_status().await);
                }
            };
            // A lab stopped by `kill` or `timeout` (SIGTERM) or by its terminal closing
            // (SIGHUP) must tear down as Ctrl-C does: otherwise its namespaces and daemons stay.
            let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
            let mut hangup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
                _ = term.recv() => {}
                _ = hangup.recv() => {}
                () = live => {}
            }
            lab.down().await
        }
    }
}

struct Lab {
    prefix: String,
}

/// One tour step's outcome.
struct Step {
    ok: bool,
    text: String,
}

impl Lab {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn state(&self) -> PathBuf {
        PathBuf::from(format!("/run/vipgate-lab/{}", self.prefix))
    }

    fn control(&self, host: &str) -> PathBuf {
        self.state().join(format!("{host}.sock"))
    }

    /// Writes the embedded scripts where bash can run them (one copy per lab, so labs with
    /// different prefixes never race on the files).
    fn scripts_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = PathBuf::from(format!("/run/vipgate-lab/.scripts-{}", self.prefix));
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

    async fn script(&self, name: &str) -> anyhow::Result<()> {
        let script = self.scripts_dir()?.join(name);
        let status = Command::new("bash")
            .arg(&script)
            .arg(&self.prefix)
            .status()
            .await
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!(
                "{} {} failed ({status}); are you root with iproute2 installed?",
                script.display(),
                self.prefix
            );
        }
        Ok(())
    }

    async fn up(&self) -> anyhow::Result<()> {
        self.script("lab-up.sh").await?;
        for (host, _) in DAEMONS {
            self.start_daemon(host).await?;
        }
        Ok(())
    }

    async fn down(&self) -> anyhow::Result<()> {
        self.script("lab-down.sh").await?;
        let dir = self.scripts_dir()?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
    }

    /// Starts `vipgate run` on `host` (unless one already answers) and waits until it does.
    async fn start_daemon(&self, host: &str) -> anyhow::Result<()> {
        let control = self.control(host);
        if crate::control::request(&control, &crate::control::Request::Status)
            .await
            .is_ok()
        {
            return Ok(());
        }
        let (_, template) = DAEMONS
            .iter()
            .find(|(h, _)| *h == host)
            .context("no such lab daemon")?;
        let state = self.state();
        let config = state.join(format!("{host}.toml"));
        std::fs::write(
            &config,
            template.replace("@STATE@", &state.to_string_lossy()),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = std::fs::File::create(state.join(format!("{host}.log")))?;
        let exe = std::env::current_exe().context("finding the vipgate binary")?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(&exe)
            .args(["run", "-c"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own session: Ctrl-C on the lab must not reach the daemons before `down` stops them.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn()
            .with_context(|| format!("starting vipgate on {host}"))?;
        let deadline = now() + Duration::from_secs(15);
        loop {
            if crate::control::request(&control, &crate::control::Request::Status)
                .await
                .is_ok()
            {
                return Ok(());
            }
            if now() > deadline {
                let log =
                    std::fs::read_to_string(state.join(format!("{host}.log"))).unwrap_or_default();
                bail!("vipgate on {host} did not come up:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sh(&self, host: &str, cmd: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "sh", "-c", cmd])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Runs the scripted tour; prints each step; returns how many failed.
    async fn tour(&self) -> usize {
        println!("\nTour of lab {}:", self.prefix);
        let gre = self.step_gre().await;
        let pat_web = self.step_pat_web().await;
        let pat_ssh = self.step_pat_ssh().await;
        let lb = self.step_lb().await;
        let lb_dr = self.step_lb_dr().await;
        let (failover, sync) = self.step_failover().await;
        let steps = [
            gre,
            pat_web,
            pat_ssh,
            lb,
            lb_dr,
            failover,
            sync,
            self.step_return().await,
        ];
        let mut failed = 0;
        for s in &steps {
            println!("  [{}] {}", if s.ok { " ok " } else { "FAIL" }, s.text);
            failed += usize::from(!s.ok);
        }
        failed
    }

    async fn step_gre(&self) -> Step {
        let t = now();
        match self
            .sh("brpc", "curl -sS --max-time 5 http://192.168.101.101/")
            .await
        {
            Ok(body) if body == "web" => Step {
                ok: true,
                text: format!(
                    "GRE: br-pc (192.168.102.10) fetched http://192.168.101.101/ across the tunnel: \"{body}\" in {} ms",
                    t.elapsed().as_millis()
                ),
            },
            other => Step {
                ok: false,
                text: format!(
                    "GRE: br-pc could not fetch the HQ web page over the tunnel: {other:?}"
                ),
            },
        }
    }

    async fn step_pat_web(&self) -> Step {
        match self
            .sh("inet", "curl -sS --max-time 5 http://198.51.100.1:8001/")
            .await
        {
            Ok(body) if body == "web" => Step {
                ok: true,
                text: "PAT: the internet host fetched http://198.51.100.1:8001/ -> web:80: \"web\""
                    .into(),
            },
            other => Step {
                ok: false,
                text: format!(
                    "PAT: http://198.51.100.1:8001/ from the internet host failed: {other:?}"
                ),
            },
        }
    }

    async fn step_pat_ssh(&self) -> Step {
        let key = self.state().join("id_ed25519");
        let cmd = format!(
            "ssh -i {} -p 20022 -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o LogLevel=ERROR root@198.51.100.1 'cat /proc/sys/kernel/hostname; ip -4 -br addr show eth0'",
            key.display()
        );
        match self.sh("inet", &cmd).await {
            Ok(out) if out.contains("192.168.101.101") => Step {
                ok: true,
                text: "PAT: the internet host ran a command on web over OpenSSH via 198.51.100.1:20022 -> web:22".into(),
            },
            other => Step { ok: false, text: format!("PAT: ssh -p 20022 198.51.100.1 failed: {other:?}") },
        }
    }

    async fn step_lb(&self) -> Step {
        let (mut rs1, mut rs2, mut other) = (0, 0, 0);
        for _ in 0..30 {
            match self
                .sh("inet", "curl -sS --max-time 3 http://198.51.100.10/")
                .await
                .as_deref()
            {
                Ok("rs1") => rs1 += 1,
                Ok("rs2") => rs2 += 1,
                _ => other += 1,
            }
        }
        Step {
            ok: other == 0 && rs1 == 10 && rs2 == 20,
            text: format!(
                "LB: 30 requests to the VIP http://198.51.100.10/: rs1 {rs1}, rs2 {rs2}, failed {other} (wrr weights 1:2)"
            ),
        }
    }

    /// Bytes the real servers sent over their legs on the isp segment (only the direct-routing
    /// service's answers take them).
    async fn dr_leg_tx_bytes(&self) -> u64 {
        let mut total = 0;
        for rs in ["rs1", "rs2"] {
            total += self
                .sh(rs, "cat /sys/class/net/eth1/statistics/tx_bytes")
                .await
                .ok()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        total
    }

    /// Direct routing: requests to the DR VIP alternate between the real servers (rr), and
    /// their answers leave by the servers' own legs on the isp segment, not through a director.
    async fn step_lb_dr(&self) -> Step {
        let before = self.dr_leg_tx_bytes().await;
        let (mut rs1, mut rs2, mut other) = (0, 0, 0);
        for _ in 0..10 {
            match self
                .sh("inet", "curl -sS --max-time 3 http://198.51.100.20:8080/")
                .await
                .as_deref()
            {
                Ok("rs1") => rs1 += 1,
                Ok("rs2") => rs2 += 1,
                _ => other += 1,
            }
        }
        let sent = self.dr_leg_tx_bytes().await.saturating_sub(before);
        // Ten HTTP answers (headers and body) are well over 1 KB.
        Step {
            ok: other == 0 && rs1 == 5 && rs2 == 5 && sent > 1000,
            text: format!(
                "LB-DR: 10 requests to http://198.51.100.20:8080/ (forward = \"dr\"): rs1 {rs1}, rs2 {rs2}, failed {other}; the real servers answered directly, {sent} bytes out of their own isp legs"
            ),
        }
    }

    /// Size in bytes of a file of the lab's state directory (0 when absent).
    fn state_file_len(&self, name: &str) -> u64 {
        std::fs::metadata(self.state().join(name)).map_or(0, |m| m.len())
    }

    /// Standby flows director2 holds from director1's sync.
    async fn standby_flows(&self, host: &str) -> u64 {
        let show = crate::control::Request::Show {
            kind: crate::parts::Kind::Sync,
        };
        crate::control::request(&self.control(host), &show)
            .await
            .ok()
            .and_then(|v| v.get(0)?.get("standby_flows")?.as_u64())
            .unwrap_or(0)
    }

    /// Starts a 4 MiB download through the VIP at `rate` (curl's --limit-rate) on the internet
    /// host (in the background, its exit code written next to it) and waits until it is under
    /// way and, with `standby_on`, that director holds its flow as standby (flow sync).
    async fn start_synced_download(
        &self,
        rate: &str,
        standby_on: Option<&str>,
    ) -> Result<(), String> {
        let state = self.state();
        let _ = std::fs::remove_file(state.join("dl.bin"));
        let _ = std::fs::remove_file(state.join("dl.rc"));
        let cmd = format!(
            "setsid sh -c 'curl -sS --limit-rate {rate} --max-time 30 -o {dir}/dl.bin http://198.51.100.10/big.bin; echo $? > {dir}/dl.rc' </dev/null >/dev/null 2>&1 &",
            dir = state.display()
        );
        self.sh("inet", &cmd).await?;
        let deadline = now() + Duration::from_secs(5);
        while now() < deadline {
            let synced = match standby_on {
                Some(host) => self.standby_flows(host).await > 0,
                None => true,
            };
            if self.state_file_len("dl.bin") >= 256 * 1024 && synced {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "the download did not get under way (with its flow synced) within 5 s: {} bytes",
            self.state_file_len("dl.bin"),
        ))
    }

    /// Waits for the download of [`Self::start_synced_download`] to end and compares it with
    /// the real servers' file; `what` names the event it crossed.
    async fn finish_synced_download(&self, what: &str) -> Step {
        let deadline = now() + Duration::from_secs(35);
        while now() < deadline && self.state_file_len("dl.rc") == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let state = self.state();
        let rc = std::fs::read_to_string(state.join("dl.rc")).unwrap_or_default();
        let same = self
            .sh(
                "inet",
                &format!("cmp -s {0}/dl.bin {0}/big.bin", state.display()),
            )
            .await
            .is_ok();
        let got = self.state_file_len("dl.bin");
        Step {
            ok: rc.trim() == "0" && same,
            text: format!(
                "Sync: a 4 MiB download through the VIP {} across {what} ({got} bytes, curl exit {})",
                if same {
                    "finished intact"
                } else {
                    "did NOT survive"
                },
                rc.trim()
            ),
        }
    }

    /// Takes director1 down the way a host dies (link down, daemon killed) and measures how
    /// long the VIP stays unanswered from the internet host, probing every 10 ms. A download
    /// through the VIP runs across it (the second step: flow sync kept it).
    async fn step_failover(&self) -> (Step, Step) {
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.ns("dir1")])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let probe = "curl -s -o /dev/null -w '%{http_code}' --max-time 0.2 http://198.51.100.10/";
        if self.sh("inet", probe).await.as_deref() != Ok("200") {
            let failed = |what: &str| Step {
                ok: false,
                text: format!("{what}: the VIP does not answer before the failover"),
            };
            return (failed("VRRP"), failed("Sync"));
        }
        let download = self.start_synced_download("1M", Some("dir2")).await;
        let _ = self
            .sh("isp", "ip link set p-dir1 down; ip link set r-dir1 down")
            .await;
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status().await;
        }
        let t0 = now();
        let mut last_fail = None;
        let deadline = t0 + Duration::from_secs(15);
        let mut ok_streak = 0;
        while now() < deadline && ok_streak < 5 {
            if self.sh("inet", probe).await.as_deref() == Ok("200") {
                ok_streak += 1;
            } else {
                ok_streak = 0;
                last_fail = Some(now());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gap = last_fail.map_or(Duration::ZERO, |t| t - t0);
        let answered_by = self
            .sh("inet", "curl -sS --max-time 2 http://198.51.100.10/")
            .await
            .unwrap_or_default();
        let master2 = self.vrrp_master("dir2").await;
        let failover = Step {
            ok: ok_streak >= 5 && master2,
            text: format!(
                "VRRP: director1 died (link down + kill -9); the VIP kept answering from director2 (master: {master2}, reply \"{answered_by}\") after a {} ms gap",
                gap.as_millis()
            ),
        };
        let sync = match download {
            Ok(()) => {
                self.finish_synced_download(
                    "the failover (started on director1, synced to director2)",
                )
                .await
            }
            Err(e) => Step {
                ok: false,
                text: format!("Sync: {e}"),
            },
        };
        (failover, sync)
    }

    /// Whether every VRRP instance of `host`'s daemon is master.
    async fn vrrp_master(&self, host: &str) -> bool {
        let show = crate::control::Request::Show {
            kind: crate::parts::Kind::Vrrp,
        };
        crate::control::request(&self.control(host), &show)
            .await
            .is_ok_and(|v| {
                v.as_array()
                    .is_some_and(|a| !a.is_empty() && a.iter().all(|i| i["state"] == "MASTER"))
            })
    }

    /// Brings director1 back (links up, daemon restarted) while a download runs through
    /// director2: director1 pulls the flows, preempts, the VIP answers and the download
    /// finishes intact through it.
    async fn step_return(&self) -> Step {
        if let Err(e) = self.start_synced_download("512K", None).await {
            return Step {
                ok: false,
                text: format!("VRRP + Sync: before director1's return, {e}"),
            };
        }
        let _ = self
            .sh("isp", "ip link set p-dir1 up; ip link set r-dir1 up")
            .await;
        if let Err(e) = self.start_daemon("dir1").await {
            return Step {
                ok: false,
                text: format!("VRRP: director1 could not be restarted: {e:#}"),
            };
        }
        let deadline = now() + Duration::from_secs(15);
        while now() < deadline {
            if self.vrrp_master("dir1").await
                && self
                    .sh("inet", "curl -sS --max-time 2 http://198.51.100.10/")
                    .await
                    .is_ok()
            {
                let download = self
                    .finish_synced_download("the fail-back (started on director2)")
                    .await;
                return Step {
                    ok: download.ok,
                    text: format!(
                        "VRRP: director1 came back, took the flow-sync snapshot from director2, preempted (priority 150 > 100) and serves the VIP again. {}",
                        download.text
                    ),
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Step {
            ok: false,
            text: "VRRP: director1 came back but did not take the VIP over within 15 s".into(),
        }
    }

    async fn status(&self) -> String {
        let mut out = format!("lab {}:\n", self.prefix);
        for host in HOSTS {
            let ns = self.ns(host);
            if !Path::new("/run/netns").join(&ns).exists() {
                let _ = writeln!(out, "  {ns:<12} absent");
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
            let daemon = if DAEMONS.iter().any(|(h, _)| *h == host) {
                match crate::control::request(&self.control(host), &crate::control::Request::Status)
                    .await
                {
                    Ok(_) => "  [vipgate running]",
                    Err(_) => "  [vipgate not running]",
                }
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {ns:<12} {}{daemon}",
                if list.is_empty() {
                    "(switch)".into()
                } else {
                    list.join(", ")
                }
            );
        }
        out
    }

    async fn live_status(&self) -> String {
        let mut out = format!(
            "vipgate lab {} — live status (Ctrl-C tears it down)\n",
            self.prefix
        );
        for (host, _) in DAEMONS {
            let _ = writeln!(out, "\n### {host} ({})", self.ns(host));
            match crate::control::request(&self.control(host), &crate::control::Request::Status)
                .await
            {
                Ok(v) => out.push_str(&crate::render_status(&v)),
                Err(_) => out.push_str("  vipgate not running\n"),
            }
        }
        out
    }
}

/// The lab measures real time (failover gaps); the clock ban is for protocol cores.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}
