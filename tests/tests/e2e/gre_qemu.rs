//! GRE against a real Linux `ip_gre`: this kernel has none, so the peer is the Debian kernel
//! (linux-image-amd64, 6.1) booted under qemu with TCG from a busybox initramfs that
//! `netns-scripts/qemu-gre-peer.sh` builds at test time, its NIC a tap device in the gateway's
//! namespace.
//!
//! ```text
//!  gw (vipgate) 198.51.100.1 tap0 ---- eth0 198.51.100.2 VM (ip_gre)
//!    gre-kern 172.16.1.1/30  key 42, kernel path    gk 172.16.1.2/30  key 42
//!    gre-tun  172.16.2.1/30  key 45, TUN path       gt 172.16.2.2/30  key 45
//!    gre-csum 172.16.3.1/30  key 43 + checksum      gc 172.16.3.2/30  key 43 csum
//!    gre-seq  172.16.4.1/30  key 44 + sequence      gs 172.16.4.2/30  key 44 seq
//! ```
//!
//! What the VM saw comes from its serial console (`VIPGATE-PEER ...` lines its scripts print),
//! never from asking vipgate. The four tunnels share one VM boot (about 15 s under TCG), told
//! apart by key on both ends. The test skips, saying why, when qemu, the Debian kernel or
//! busybox-static is missing, unless `VIPGATE_REQUIRE_PEERS` is set (`netns-scripts/test.sh`
//! sets it after installing them), in which case it fails.

use serde_json::Value;
use std::time::Duration;
use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_until, workspace_root};

const GW_PUB: &str = "198.51.100.1";
const VM_PUB: &str = "198.51.100.2";
/// Bytes carried each way through each tunnel (TCG moves a few MB/s).
const TRANSFER_BYTES: u64 = 2_000_000;

/// One tunnel, as both ends configure it.
struct Tunnel {
    /// vipgate's `[[gre]]` name.
    gw: &'static str,
    /// The VM's `ip tunnel` name.
    vm: &'static str,
    key: u32,
    /// Third octet of the inner /30 (gw .1, VM .2); the VM's receiver listens on 9000 + this.
    net: u8,
    /// Extra `[[gre]]` lines on vipgate's side.
    gw_options: &'static str,
    /// Extra `ip tunnel add` words on the VM's side.
    vm_options: &'static str,
    datapath: &'static str,
}

const TUNNELS: [Tunnel; 4] = [
    Tunnel {
        gw: "gre-kern",
        vm: "gk",
        key: 42,
        net: 1,
        gw_options: "",
        vm_options: "",
        datapath: "kernel",
    },
    Tunnel {
        gw: "gre-tun",
        vm: "gt",
        key: 45,
        net: 2,
        gw_options: "",
        vm_options: "",
        datapath: "tun",
    },
    Tunnel {
        gw: "gre-csum",
        vm: "gc",
        key: 43,
        net: 3,
        gw_options: "checksum = true\n",
        vm_options: "csum",
        datapath: "tun",
    },
    Tunnel {
        gw: "gre-seq",
        vm: "gs",
        key: 44,
        net: 4,
        gw_options: "sequence = true\n",
        vm_options: "seq",
        datapath: "tun",
    },
];

impl Tunnel {
    fn vm_inner(&self) -> String {
        format!("172.16.{}.2", self.net)
    }

    fn port(&self) -> u16 {
        9000 + u16::from(self.net)
    }
}

/// The VM's part after its NIC is up: forwarding and `accept_local` so that ip_gre reflects
/// vipgate's keepalives (the decapsulated probe has the VM's own address as its source), the
/// tunnels, a receiver per tunnel that prints the hash of what arrived, a random file to
/// fetch with its hash, and a CGI that deletes a tunnel.
fn vm_setup() -> String {
    let mut s = String::from(
        "sysctl -w net.ipv4.ip_forward=1\n\
         sysctl -w net.ipv4.conf.all.accept_local=1\n\
         sysctl -w net.ipv4.conf.all.rp_filter=0\n\
         sysctl -w net.ipv4.conf.default.rp_filter=0\n",
    );
    for t in &TUNNELS {
        s += &format!(
            "ip tunnel add {vm} mode gre remote {GW_PUB} local {VM_PUB} key {key} {opts}\n\
             ip addr add {inner}/30 dev {vm}\n\
             ip link set {vm} up\n",
            vm = t.vm,
            key = t.key,
            opts = t.vm_options,
            inner = t.vm_inner(),
        );
    }
    s += r#"receive() {
  while true; do
    h=$(nc -l -p "$1" </dev/null | sha256sum)
    echo "VIPGATE-PEER RX $1 ${h%% *}"
  done
}
"#;
    for t in &TUNNELS {
        s += &format!("receive {} &\n", t.port());
    }
    s += r#"head -c BYTES /dev/urandom > /www/blob
h=$(sha256sum /www/blob)
echo "VIPGATE-PEER BLOB ${h%% *}"
cat > /www/cgi-bin/del <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
case "$QUERY_STRING" in
  gk|gt) ip tunnel del "$QUERY_STRING" && echo deleted ;;
  *) echo "no such tunnel" ;;
esac
EOF
chmod +x /www/cgi-bin/del
httpd -p 80 -h /www
"#;
    s.replace("BYTES", &TRANSFER_BYTES.to_string())
}

fn gw_config(t: &Topology) -> String {
    let mut c = format!(
        "[daemon]\ncontrol = \"{}\"\n",
        t.dir().join("gw.sock").display()
    );
    for tun in &TUNNELS {
        c += &format!(
            "\n[[gre]]\nname = \"{}\"\nlocal = \"{GW_PUB}\"\nremote = \"{VM_PUB}\"\n\
             address = \"172.16.{}.1/30\"\nkey = {}\n{}datapath = \"{}\"\n\
             keepalive = {{ interval = \"1s\", retries = 3 }}\n",
            tun.gw, tun.net, tun.key, tun.gw_options, tun.datapath
        );
    }
    c
}

/// Whether the peer can be built here; `false` means skip (with a message), and a missing
/// peer fails the test when `VIPGATE_REQUIRE_PEERS` is set.
fn peer_available(script: &str) -> bool {
    let out = std::process::Command::new("bash")
        .args([script, "check"])
        .output()
        .expect("running qemu-gre-peer.sh check");
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        std::env::var_os("VIPGATE_REQUIRE_PEERS").is_none(),
        "VIPGATE_REQUIRE_PEERS is set and the qemu ip_gre peer is unavailable: {why}"
    );
    eprintln!(
        "skipped: the qemu ip_gre peer is unavailable ({})",
        why.trim()
    );
    false
}

fn tunnel(t: &Topology, name: &str) -> Option<Value> {
    let v = t.try_show("gw", t.dir().join("gw.sock"), Show::Gre)?;
    v.as_array()?.iter().find(|j| j["name"] == name).cloned()
}

fn is_up(t: &Topology, name: &str) -> bool {
    tunnel(t, name).is_some_and(|j| j["up"] == true)
}

/// The hash after `prefix` on a line of the VM's console.
fn console_hash(vm: &Proc, prefix: &str) -> Option<String> {
    vm.log().lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(prefix)
            .map(|h| h.trim().to_string())
    })
}

/// Hash-checked TCP both ways through each tunnel; ip_gre on the VM with `csum` or `seq`
/// drops anything without a valid checksum or sequence number, so arriving proves those too.
/// Then Cisco-style keepalives: ip_gre reflects them, and deleting the VM's tunnel takes
/// vipgate's down on both data paths while the others stay up.
#[test]
fn a_linux_ip_gre_peer_in_qemu_interoperates() {
    let script = workspace_root().join("netns-scripts/qemu-gre-peer.sh");
    let script = script.to_str().unwrap();
    if !peer_available(script) {
        return;
    }
    let mut t = e2e!();
    t.host("gw");
    let dir = t.dir().display().to_string();
    let setup = t.write("vm-setup.sh", &vm_setup());
    t.sh(
        "gw",
        &format!("bash {script} build {dir} {} {VM_PUB}/24", setup.display()),
    );
    let vm = t.spawn("gw", "qemu", &["bash", script, "boot", &dir, "tap0"]);
    wait_until(Duration::from_secs(10), "qemu's tap0", || {
        t.try_sh("gw", "ip link show tap0").is_ok()
    });
    t.addr("gw", "tap0", &format!("{GW_PUB}/24"));
    t.ip("gw", "link set tap0 up");
    t.write("gw.toml", &gw_config(&t));
    let cfg = t.dir().join("gw.toml");
    let _gw = t.vipgate("gw", "vipgate-gw", &["run", "-c", cfg.to_str().unwrap()]);

    wait_until(Duration::from_secs(90), "the VM's READY line", || {
        let log = vm.log();
        assert!(
            !log.contains("VIPGATE-PEER FAILED"),
            "the VM's setup failed:\n{log}"
        );
        log.contains("VIPGATE-PEER READY")
    });
    for tun in &TUNNELS {
        wait_until(
            Duration::from_secs(15),
            &format!("{} up (keepalives reflected by ip_gre)", tun.gw),
            || is_up(&t, tun.gw),
        );
        let j = tunnel(&t, tun.gw).unwrap();
        assert_eq!(j["datapath"], tun.datapath, "{j}");
    }

    let blob = console_hash(&vm, "VIPGATE-PEER BLOB ").expect("the VM's BLOB line");
    for tun in &TUNNELS {
        // gw → VM: the VM's receiver prints the hash of what arrived on its console.
        let sent = format!("{dir}/sent-{}", tun.gw);
        t.sh(
            "gw",
            &format!("head -c {TRANSFER_BYTES} /dev/urandom > {sent}"),
        );
        let expected = t.sh("gw", &format!("sha256sum < {sent} | cut -d' ' -f1"));
        // The receiver is a loop of one-shot `nc -l`: a connection refused between two of
        // them is retried.
        wait_until(
            Duration::from_secs(60),
            &format!("{TRANSFER_BYTES} bytes sent to the VM through {}", tun.gw),
            || {
                t.try_sh(
                    "gw",
                    &format!(
                        "timeout 60 socat -u FILE:{sent} TCP:{}:{},connect-timeout=2",
                        tun.vm_inner(),
                        tun.port()
                    ),
                )
                .is_ok()
            },
        );
        let rx = format!("VIPGATE-PEER RX {} {}", tun.port(), expected.trim());
        wait_until(
            Duration::from_secs(20),
            &format!("the VM's hash of what came through {}", tun.gw),
            || vm.log().lines().any(|l| l.trim_end() == rx),
        );
        // VM → gw: busybox httpd serves the file whose hash the VM printed.
        let got = format!("{dir}/got-{}", tun.gw);
        t.sh(
            "gw",
            &format!(
                "curl -sSf --max-time 60 -o {got} http://{}/blob",
                tun.vm_inner()
            ),
        );
        let hash = t.sh("gw", &format!("sha256sum < {got} | cut -d' ' -f1"));
        assert_eq!(hash.trim(), blob, "bytes changed in {}", tun.gw);
    }
    // Both directions of gre-kern went through the kernel programs. The gateway does not
    // forward (ip_forward is off here), so the kernel refuses the encap program's FIB
    // lookup and the program sends the gateway's own packets out of the underlay recorded
    // at start.
    let kern = tunnel(&t, "gre-kern").unwrap();
    assert!(
        counter(&kern, &["kernel", "rx_packets"]) > 0,
        "the kernel path decapsulated gre-kern's traffic: {kern}"
    );
    assert!(
        counter(&kern, &["kernel", "tx_bytes"]) > TRANSFER_BYTES / 2,
        "the kernel path encapsulated the gateway's own traffic: {kern}"
    );
    for tun in &TUNNELS {
        let j = tunnel(&t, tun.gw).unwrap();
        for drop in ["bad_checksum", "out_of_sequence", "wrong_key"] {
            assert_eq!(counter(&j, &["counters", "drops", drop]), 0, "{drop}: {j}");
        }
        assert!(counter(&j, &["counters", "keepalive_replies"]) > 0, "{j}");
    }

    // Without the VM's tunnel nothing reflects the probes: down after 3 missed seconds.
    for vm_tunnel in ["gk", "gt"] {
        let out = t.sh(
            "gw",
            &format!("curl -sSf --max-time 10 'http://{VM_PUB}/cgi-bin/del?{vm_tunnel}'"),
        );
        assert_eq!(out.trim(), "deleted", "{vm_tunnel}");
    }
    for name in ["gre-kern", "gre-tun"] {
        wait_until(Duration::from_secs(10), &format!("{name} down"), || {
            tunnel(&t, name).is_some_and(|j| j["up"] == false)
        });
        let j = tunnel(&t, name).unwrap();
        assert!(
            j["down_reason"]
                .as_str()
                .is_some_and(|r| r.contains("keepalive")),
            "{j}"
        );
    }
    let replies = counter(
        &tunnel(&t, "gre-seq").unwrap(),
        &["counters", "keepalive_replies"],
    );
    wait_until(Duration::from_secs(5), "more replies on gre-seq", || {
        tunnel(&t, "gre-seq")
            .is_some_and(|j| counter(&j, &["counters", "keepalive_replies"]) > replies)
    });
    assert!(is_up(&t, "gre-csum") && is_up(&t, "gre-seq"));
}
