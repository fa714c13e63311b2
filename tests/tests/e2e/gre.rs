//! GRE site-to-site: two branch routers running vipgate across an "isp" router that knows
//! only their public addresses, with a host on each LAN.
//!
//! ```text
//!  hqpc 192.168.101.10 -- hq (198.51.100.1) -- isp -- br (198.51.100.2) -- brpc 192.168.102.10
//!                         gre-br 172.16.0.1/30         gre-hq 172.16.0.2/30
//! ```
//!
//! What the ISP forwards is counted by nftables inside the isp namespace, never by asking
//! vipgate.
//!
//! Each test runs on both data paths: the kernel path (the default: TC programs encapsulate
//! and decapsulate, the TUN path takes the rest) and the TUN path (`datapath = "tun"`); a
//! mixed pair (one of each) carries hash-checked TCP both ways.

use serde_json::Value;
use std::time::{Duration, Instant};
use vipgate_tests::{Proc, Show, Topology, counter, e2e, wait_for, wait_until};

const HQ_PUB: &str = "198.51.100.1";
const BR_PUB: &str = "198.51.100.2";
const BR_PC: &str = "192.168.102.10";

struct Branches {
    t: Topology,
    hq: Option<Proc>,
    br: Option<Proc>,
}

/// Per-site options appended to each `[[gre]]` section, `datapath` last.
fn site_config(t: &Topology, site: &str, extra: &str, datapath: &str) -> String {
    let (name, local, remote, inner, lan) = if site == "hq" {
        (
            "gre-br",
            HQ_PUB,
            BR_PUB,
            "172.16.0.1/30",
            "192.168.102.0/24",
        )
    } else {
        (
            "gre-hq",
            BR_PUB,
            HQ_PUB,
            "172.16.0.2/30",
            "192.168.101.0/24",
        )
    };
    format!(
        "[daemon]\ncontrol = \"{}\"\n\n[[gre]]\nname = \"{name}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\n\
         address = \"{inner}\"\nroutes = [\"{lan}\"]\n{extra}\n{datapath}\n",
        t.dir().join(format!("{site}.sock")).display(),
        datapath = if datapath.is_empty() {
            String::new()
        } else {
            format!("datapath = \"{datapath}\"")
        }
    )
}

impl Branches {
    /// Both routers on `datapath`.
    fn new(t: Topology, extra: &str, datapath: &str) -> Self {
        Self::mixed(t, extra, [datapath, datapath])
    }

    /// HQ on `datapaths[0]`, BR on `datapaths[1]`; each tunnel runs on the data path asked
    /// for (checked in `show gre`). An empty data path leaves the key out.
    fn mixed(mut t: Topology, extra: &str, datapaths: [&str; 2]) -> Self {
        t.hosts(&["isp", "hq", "br", "hqpc", "brpc"]);
        t.veth("hq", "e0", "isp", "ihq")
            .veth("br", "e0", "isp", "ibr")
            .veth("hq", "e1", "hqpc", "e0")
            .veth("br", "e1", "brpc", "e0");
        // The ISP routes the two public /32s and nothing else; proxy ARP lets each router
        // reach the other on its /24 through it.
        t.sh(
            "isp",
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.proxy_arp=1 \
             net.ipv4.conf.ihq.proxy_arp=1 net.ipv4.conf.ibr.proxy_arp=1 \
             net.ipv4.neigh.ihq.proxy_delay=0 net.ipv4.neigh.ibr.proxy_delay=0",
        );
        t.addr("isp", "ihq", "198.51.100.254/32")
            .addr("isp", "ibr", "198.51.100.254/32");
        t.ip("isp", &format!("route add {HQ_PUB}/32 dev ihq"));
        t.ip("isp", &format!("route add {BR_PUB}/32 dev ibr"));
        // Counted in the ISP's forward path: tunnel packets are accepted after counting,
        // so `other` sees everything else.
        let rules = t.write(
            "isp.nft",
            "table inet isp {
  counter gre_raw { }
  counter gre_udp { }
  counter other { }
  counter fragments { }
  counter lan_src { }
  chain transit {
    type filter hook forward priority 0; policy accept;
    ip frag-off & 0x3fff != 0 counter name fragments
    ip saddr 192.168.0.0/16 counter name lan_src
    ip protocol gre counter name gre_raw accept
    udp dport 4754 counter name gre_udp accept
    counter name other
  }
}
",
        );
        t.sh("isp", &format!("nft -f {}", rules.display()));
        t.forwarding("hq").forwarding("br");
        t.addr("hq", "e0", &format!("{HQ_PUB}/24"))
            .addr("br", "e0", &format!("{BR_PUB}/24"))
            .addr("hq", "e1", "192.168.101.1/24")
            .addr("br", "e1", "192.168.102.1/24")
            .addr("hqpc", "e0", "192.168.101.10/24")
            .addr("brpc", "e0", "192.168.102.10/24");
        t.ip("hqpc", "route add default via 192.168.101.1");
        t.ip("brpc", "route add default via 192.168.102.1");
        t.write("hq.toml", &site_config(&t, "hq", extra, datapaths[0]));
        t.write("br.toml", &site_config(&t, "br", extra, datapaths[1]));
        let mut b = Branches {
            t,
            hq: None,
            br: None,
        };
        b.start("hq");
        b.start("br");
        b.wait_up("hq");
        b.wait_up("br");
        for (site, datapath) in ["hq", "br"].into_iter().zip(datapaths) {
            if datapath.is_empty() {
                continue;
            }
            let j = b.tunnel(site).unwrap();
            assert_eq!(j["datapath"], datapath, "{site}: {j}");
            assert_eq!(
                j["datapath_reason"],
                format!("configured: datapath = \"{datapath}\""),
                "{site}: {j}"
            );
        }
        b
    }

    fn start(&mut self, site: &str) {
        let cfg = self.t.dir().join(format!("{site}.toml"));
        let p = self.t.vipgate(
            site,
            &format!("vipgate-{site}"),
            &["run", "-c", cfg.to_str().unwrap()],
        );
        if site == "hq" {
            self.hq = Some(p);
        } else {
            self.br = Some(p);
        }
    }

    /// `show gre` as text, if the site's daemon answers.
    fn show_text(&self, site: &str) -> Option<String> {
        let sock = self.t.dir().join(format!("{site}.sock"));
        let out = self
            .t
            .vipgate_output(site, &["show", "gre", "--control", sock.to_str().unwrap()]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The site's tunnel in `show gre --json` (one per daemon here), if its daemon answers.
    fn tunnel(&self, site: &str) -> Option<Value> {
        let sock = self.t.dir().join(format!("{site}.sock"));
        let v = self.t.try_show(site, sock, Show::Gre)?;
        v.as_array().and_then(|a| a.first()).cloned()
    }

    /// `up` or `down` from the tunnel's `up` field, or the supervisor's `state` (`dead`).
    fn state(&self, site: &str) -> Option<String> {
        let t = self.tunnel(site)?;
        match t["up"].as_bool() {
            Some(up) => Some(if up { "up" } else { "down" }.to_string()),
            None => t["state"].as_str().map(str::to_string),
        }
    }

    fn wait_up(&self, site: &str) {
        wait_until(
            Duration::from_secs(10),
            &format!("{site} tunnel up"),
            || self.state(site).as_deref() == Some("up"),
        );
    }

    fn counter(&self, site: &str, path: &[&str]) -> u64 {
        counter(&self.tunnel(site).expect("show gre --json"), path)
    }

    fn nft(&self, name: &str) -> u64 {
        let out = self
            .t
            .sh("isp", &format!("nft list counter inet isp {name}"));
        out.split("packets ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read nft counter {name}: {out}"))
    }

    fn nft_bytes(&self, name: &str) -> u64 {
        let out = self
            .t
            .sh("isp", &format!("nft list counter inet isp {name}"));
        out.split("bytes ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read nft counter {name}: {out}"))
    }

    fn ping(&self, from: &str, to: &str) -> Result<String, String> {
        self.t.try_sh(from, &format!("ping -c 2 -i 0.2 -W 2 {to}"))
    }
}

/// Sends a crafted GRE packet from `host` to the HQ router with python3's raw socket.
fn send_gre(t: &Topology, host: &str, hex: &str) {
    t.sh(
        host,
        &format!(
            "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_RAW, 47); \
             s.sendto(bytes.fromhex('{hex}'), ('{HQ_PUB}', 0))\""
        ),
    );
}

fn lans_talk_over_gre_and_the_isp_sees_only_gre_on(t: Topology, datapath: &str) {
    let b = Branches::new(
        t,
        "key = 42\nkeepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    // Until both daemons had their sockets open, a probe could meet a router with nothing
    // listening for GRE and draw an ICMP protocol-unreachable: count from "both up" on.
    b.t.sh("isp", "nft reset counters table inet isp >/dev/null");
    b.ping("hqpc", BR_PC).expect("ping across the tunnel");
    // The ISP has no route to the LANs: without the tunnel this could not work.
    assert!(b.t.try_sh("isp", &format!("ping -c1 -W1 {BR_PC}")).is_err());

    // 50 MB of random bytes over TCP, LAN MTU 1500 on both sides, checked by hash.
    let dir = b.t.dir().display().to_string();
    b.t.sh(
        "hqpc",
        &format!("head -c 50000000 /dev/urandom > {dir}/sent"),
    );
    let _sink = b.t.spawn(
        "brpc",
        "sink",
        &[
            "socat",
            "-u",
            "TCP-LISTEN:5001,reuseaddr",
            &format!("CREATE:{dir}/received"),
        ],
    );
    b.t.wait_listening("brpc", 5001);
    let started = Instant::now();
    b.t.sh(
        "hqpc",
        &format!("socat -u FILE:{dir}/sent TCP:{BR_PC}:5001"),
    );
    let hash = |f: &str| {
        b.t.sh("hqpc", &format!("sha256sum < {dir}/{f} | cut -d' ' -f1"))
    };
    wait_until(Duration::from_secs(30), "the whole file to arrive", || {
        std::fs::metadata(format!("{dir}/received")).is_ok_and(|m| m.len() == 50_000_000)
    });
    assert_eq!(
        hash("sent"),
        hash("received"),
        "bytes changed in the tunnel"
    );
    eprintln!("50 MB over the tunnel in {:?}", started.elapsed());

    // Only GRE crossed the ISP: no inner LAN address, nothing else, and no fragments (the
    // MSS clamp made TCP fit the 1472-byte tunnel MTU).
    assert!(
        b.nft_bytes("gre_raw") > 50_000_000,
        "GRE bytes counted: {}",
        b.nft_bytes("gre_raw")
    );
    if datapath == "kernel" {
        // GSO kept: the ISP forwarded GRE super-packets, far fewer than 1500-byte frames.
        assert!(
            b.nft("gre_raw") < 20_000,
            "GRE packets counted: {}",
            b.nft("gre_raw")
        );
    } else {
        assert!(
            b.nft("gre_raw") > 35_000,
            "GRE packets counted: {}",
            b.nft("gre_raw")
        );
    }
    assert_eq!(b.nft("other"), 0, "non-GRE traffic crossed the ISP");
    assert_eq!(b.nft("gre_udp"), 0);
    assert_eq!(b.nft("lan_src"), 0, "a LAN address was visible at the ISP");
    assert_eq!(b.nft("fragments"), 0, "outer packets were fragmented");
    assert!(b.counter("hq", &["counters", "mss_clamped"]) >= 1);
    assert!(b.counter("br", &["counters", "mss_clamped"]) >= 1);

    // PMTU: a DF packet larger than the tunnel MTU (1500 - 24 - 4 for the key) is refused
    // with ICMP fragmentation-needed carrying the tunnel MTU.
    let out =
        b.t.try_sh(
            "hqpc",
            &format!("ping -c1 -W2 -M do -s 1460 {BR_PC} 2>&1; true"),
        )
        .unwrap();
    assert!(out.contains("mtu = 1472"), "no frag-needed: {out}");
    b.t.try_sh("hqpc", &format!("ping -c1 -W2 -M do -s 1444 {BR_PC}"))
        .expect("a packet that fits the tunnel MTU passes with DF");

    let text = b.show_text("hq").unwrap();
    assert!(text.contains("gre-br is up"), "{text}");
    assert!(
        text.contains("routes installed: 192.168.102.0/24"),
        "{text}"
    );
}

/// `bytes` random bytes from `from` to `to_host` (listening at `to_addr`:`port`) over TCP,
/// compared by hash; the receiver's copy must be complete within 30 s.
fn transfer_is_intact(
    t: &Topology,
    from: &str,
    to_host: &str,
    to_addr: &str,
    port: u16,
    bytes: u64,
) {
    let dir = t.dir().display().to_string();
    let (sent, received) = (
        format!("{dir}/sent-{from}"),
        format!("{dir}/received-{to_host}"),
    );
    t.sh(from, &format!("head -c {bytes} /dev/urandom > {sent}"));
    // An IPv6 address (it has colons) goes in brackets, over socat's TCP6.
    let (listen, connect) = if to_addr.contains(':') {
        ("TCP6-LISTEN", format!("TCP6:[{to_addr}]:{port}"))
    } else {
        ("TCP-LISTEN", format!("TCP:{to_addr}:{port}"))
    };
    let _sink = t.spawn(
        to_host,
        &format!("sink-{to_host}"),
        &[
            "socat",
            "-u",
            &format!("{listen}:{port},reuseaddr"),
            &format!("CREATE:{received}"),
        ],
    );
    t.wait_listening(to_host, port);
    // Bounded: a tunnel that cannot carry the segments stalls the sender, not the suite.
    t.sh(from, &format!("timeout 60 socat -u FILE:{sent} {connect}"));
    wait_until(Duration::from_secs(30), "the whole file to arrive", || {
        std::fs::metadata(&received).is_ok_and(|m| m.len() == bytes)
    });
    let hash = |f: &str| t.sh(from, &format!("sha256sum < {f} | cut -d' ' -f1"));
    assert_eq!(hash(&sent), hash(&received), "bytes changed in the tunnel");
}

/// One end on the kernel path, the other on the TUN path. The kernel path sends GSO
/// super-packets whose inner TCP checksum is still partial (nothing on veth finishes it);
/// the TUN end reads them whole from its raw socket and must hand them to its TUN with the
/// checksum left for the kernel to finish and, when longer than the tunnel MTU, to segment.
#[test]
fn a_kernel_path_end_and_a_tun_path_end_interoperate() {
    let b = Branches::mixed(e2e!(), "key = 42", ["kernel", "tun"]);
    b.ping("hqpc", BR_PC).expect("ping across the tunnel");
    // Kernel path → TUN path, then back, 20 MB each, LAN MTU 1500 on both sides.
    transfer_is_intact(&b.t, "hqpc", "brpc", BR_PC, 5001, 20_000_000);
    transfer_is_intact(&b.t, "brpc", "hqpc", "192.168.101.10", 5002, 20_000_000);
    assert!(
        b.counter("hq", &["kernel", "tx_bytes"]) > 15_000_000,
        "the kernel end carried the transfer itself: {}",
        b.tunnel("hq").unwrap()
    );
    assert!(b.counter("br", &["counters", "rx_bytes"]) > 19_000_000);
    // Nothing was refused for a bad checksum on either LAN host, and no router had to
    // fragment (or failed to): the TUN end segmented the super-packets at its MTU.
    for host in ["hqpc", "brpc"] {
        let errors = b.t.sh(
            host,
            "nstat -az TcpInCsumErrors | awk '/TcpInCsumErrors/ {print $2}'",
        );
        assert_eq!(errors.trim(), "0", "{host}: TCP checksum errors");
    }
    let frag_fails = b.t.sh(
        "br",
        "nstat -az IpFragFails | awk '/IpFragFails/ {print $2}'",
    );
    assert_eq!(frag_fails.trim(), "0", "br: IpFragFails");
}

/// A tunnel end that does not forward (a server reaching a remote site for itself): the
/// kernel refuses the encap program's FIB lookup there (forwarding is off on the TUN), and the
/// program sends the host's own packets out of the underlay interface recorded at start.
#[test]
fn a_host_that_does_not_forward_sends_its_own_traffic_on_the_kernel_path() {
    let b = Branches::new(e2e!(), "key = 42", "kernel");
    b.t.sh("hq", "sysctl -qw net.ipv4.ip_forward=0");
    transfer_is_intact(&b.t, "hq", "br", "172.16.0.2", 5001, 20_000_000);
    let hq = b.tunnel("hq").unwrap();
    assert!(
        counter(&hq, &["kernel", "tx_bytes"]) > 19_000_000,
        "the kernel path carried hq's own transfer: {hq}"
    );
    // Only the SYN was left to the TUN path (its MSS is clamped there).
    assert!(counter(&hq, &["kernel", "tx_passed"]) < 5, "{hq}");
}

/// IPv6 LANs over the IPv4 tunnel (GRE protocol type 0x86DD): the kernel path carries it
/// both ways as super-packets, and the bytes arrive intact.
#[test]
fn ipv6_lans_talk_over_the_kernel_path() {
    let b = Branches::new(e2e!(), "key = 42", "kernel");
    for (router, tun, lan, inner, pc, remote_lan) in [
        (
            "hq",
            "gre-br",
            "fd01::1/64",
            "fd00::1/64",
            "hqpc",
            "fd02::/64",
        ),
        (
            "br",
            "gre-hq",
            "fd02::1/64",
            "fd00::2/64",
            "brpc",
            "fd01::/64",
        ),
    ] {
        b.t.sh(router, "sysctl -qw net.ipv6.conf.all.forwarding=1");
        b.t.ip(router, &format!("-6 addr add {lan} dev e1 nodad"));
        b.t.ip(router, &format!("-6 addr add {inner} dev {tun} nodad"));
        b.t.ip(router, &format!("-6 route add {remote_lan} dev {tun}"));
        let host = lan.replace("::1/64", "::10/64");
        b.t.ip(pc, &format!("-6 addr add {host} dev e0 nodad"));
        let gateway = lan.trim_end_matches("/64");
        b.t.ip(pc, &format!("-6 route add default via {gateway}"));
    }
    b.t.sh("isp", "nft reset counters table inet isp >/dev/null");
    b.t.sh("hqpc", "ping -6 -c 2 -i 0.2 -W 2 fd02::10");
    transfer_is_intact(&b.t, "hqpc", "brpc", "fd02::10", 5001, 20_000_000);
    transfer_is_intact(&b.t, "brpc", "hqpc", "fd01::10", 5002, 20_000_000);
    for site in ["hq", "br"] {
        let j = b.tunnel(site).unwrap();
        for field in ["tx_bytes", "rx_bytes"] {
            assert!(
                counter(&j, &["kernel", field]) > 19_000_000,
                "{site}: the kernel path carried {field}: {j}"
            );
        }
    }
    // GSO kept: 40 MB crossed the ISP in far fewer GRE packets than 1,500-byte frames, and
    // nothing but GRE crossed it.
    assert!(b.nft_bytes("gre_raw") > 40_000_000);
    assert!(
        b.nft("gre_raw") < 30_000,
        "GRE packets: {}",
        b.nft("gre_raw")
    );
    assert_eq!(b.nft("other"), 0);
}

/// What crossed the ISP's link to HQ during a transfer each way, decoded by tshark
/// (Wireshark's dissectors, not ours): every packet is GRE version 0 with a good outer IPv4
/// header checksum, the configured key and protocol type, nothing malformed and no
/// error-level finding; a checksummed, sequenced tunnel's GRE checksums verify and its
/// sequence numbers rise per direction. Returns the largest frame seen.
fn underlay_decodes_cleanly_in_tshark(b: &Branches, checksummed: bool) -> usize {
    let cap = b.t.dir().join("underlay.pcap");
    let cap = cap.to_str().unwrap();
    let mut dump = b.t.spawn(
        "isp",
        "tcpdump",
        &["tcpdump", "-i", "ihq", "-U", "-n", "-w", cap, "ip proto 47"],
    );
    // The file header is written once the capture runs.
    wait_until(Duration::from_secs(10), "tcpdump capturing", || {
        std::fs::metadata(cap).is_ok_and(|m| m.len() >= 24)
    });
    transfer_is_intact(&b.t, "hqpc", "brpc", BR_PC, 5001, 5_000_000);
    transfer_is_intact(&b.t, "brpc", "hqpc", "192.168.101.10", 5002, 5_000_000);
    dump.signal(libc::SIGINT);
    assert!(
        dump.wait_exit(Duration::from_secs(10)).is_some(),
        "tcpdump stopped"
    );
    // The transfers' payload is random bytes: decoded as data, so that no heuristic
    // dissector (Thrift's once) mistakes it for its protocol and reports an error-level
    // finding that is not about the tunnel.
    let fields = b.t.sh(
        "isp",
        &format!(
            "tshark -n -r {cap} -o ip.check_checksum:TRUE -d tcp.port==5001,data \
             -d tcp.port==5002,data -T fields -E occurrence=f -e frame.len -e ip.src \
             -e ip.checksum.status -e gre.flags.version -e gre.key \
             -e gre.proto -e gre.flags.checksum -e gre.checksum.status -e gre.sequence_number \
             -e _ws.malformed -e _ws.expert.severity 2>/dev/null"
        ),
    );
    let mut last_sequence: std::collections::HashMap<String, u64> = Default::default();
    let mut largest = 0;
    let mut packets = 0;
    for line in fields.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 11, "{line}");
        packets += 1;
        largest = largest.max(f[0].parse::<usize>().unwrap());
        assert_eq!(f[2], "1", "outer IPv4 header checksum good (1): {line}");
        assert_eq!(f[3], "0", "GRE version 0: {line}");
        assert_eq!(f[4], "0x0000002a", "key 42: {line}");
        assert_eq!(f[5], "0x0800", "IPv4 inside: {line}");
        assert!(f[9].is_empty(), "malformed: {line}");
        // Wireshark's PI_ERROR is 0x00800000; warnings (TCP analysis) are not the wire's.
        assert!(
            f[10].split(',').all(|s| s != "8388608"),
            "an error-level finding: {line}"
        );
        if checksummed {
            assert_eq!(f[6], "1", "GRE checksum present: {line}");
            assert_eq!(f[7], "1", "GRE checksum verified good (1): {line}");
            let seq: u64 = f[8]
                .parse()
                .unwrap_or_else(|_| panic!("a sequence number: {line}"));
            if let Some(prev) = last_sequence.insert(f[1].to_string(), seq) {
                assert!(seq > prev, "sequence rises from {f:?}: {prev} -> {seq}");
            }
        } else {
            assert_eq!(f[6], "0", "no GRE checksum: {line}");
            assert!(f[8].is_empty(), "no sequence number: {line}");
        }
    }
    assert!(packets > 100, "{packets} packets decoded");
    largest
}

#[test]
fn the_kernel_path_underlay_decodes_cleanly_in_tshark() {
    let b = Branches::new(e2e!(), "key = 42", "kernel");
    let largest = underlay_decodes_cleanly_in_tshark(&b, false);
    assert!(
        largest > 1514,
        "super-packets crossed whole: largest frame {largest}"
    );
}

#[test]
fn a_checksummed_sequenced_tunnel_decodes_cleanly_in_tshark() {
    let b = Branches::new(e2e!(), "key = 42\nchecksum = true\nsequence = true", "tun");
    let largest = underlay_decodes_cleanly_in_tshark(&b, true);
    assert!(
        largest <= 1514,
        "segmented at the MTU: largest frame {largest}"
    );
}

#[test]
fn branch_lans_talk_over_gre_and_the_isp_sees_only_gre() {
    lans_talk_over_gre_and_the_isp_sees_only_gre_on(e2e!(), "kernel");
}

#[test]
fn branch_lans_talk_over_gre_and_the_isp_sees_only_gre_on_the_tun_path() {
    lans_talk_over_gre_and_the_isp_sees_only_gre_on(e2e!(), "tun");
}

fn keepalive_loss_withdraws_routes_and_return_restores_them_on(t: Topology, datapath: &str) {
    let mut b = Branches::new(
        t,
        "keepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    b.ping("hqpc", BR_PC).expect("ping before the outage");
    assert!(
        b.t.ip("hq", "route")
            .contains("192.168.102.0/24 dev gre-br")
    );

    let stopped = Instant::now();
    b.br.as_mut().unwrap().terminate(Duration::from_secs(5));
    wait_until(Duration::from_secs(6), "HQ tunnel down", || {
        b.state("hq").as_deref() == Some("down")
    });
    let detected = stopped.elapsed();
    // period × retries, plus one period of phase and some scheduling slack.
    assert!(detected <= Duration::from_millis(4500), "took {detected:?}");
    assert!(
        !b.t.ip("hq", "route").contains("192.168.102.0/24"),
        "route still installed while down"
    );
    let text = b.show_text("hq").unwrap();
    assert!(
        text.contains("gre-br is down (no keepalive reply"),
        "{text}"
    );
    assert!(text.contains("routes withdrawn"), "{text}");

    b.start("br");
    wait_until(Duration::from_secs(6), "HQ tunnel back up", || {
        b.state("hq").as_deref() == Some("up")
    });
    wait_until(Duration::from_secs(3), "route reinstalled", || {
        b.t.ip("hq", "route")
            .contains("192.168.102.0/24 dev gre-br")
    });
    wait_for(Duration::from_secs(5), "traffic after recovery", || {
        b.ping("hqpc", BR_PC).ok()
    });
}

#[test]
fn keepalive_loss_withdraws_routes_and_return_restores_them() {
    keepalive_loss_withdraws_routes_and_return_restores_them_on(e2e!(), "kernel");
}

#[test]
fn keepalive_loss_withdraws_routes_and_return_restores_them_on_the_tun_path() {
    keepalive_loss_withdraws_routes_and_return_restores_them_on(e2e!(), "tun");
}

fn wrong_key_wrong_source_and_malformed_gre_are_counted_not_fatal_on(t: Topology, datapath: &str) {
    let mut b = Branches::new(t, "key = 42", datapath);
    // A rogue host on the ISP side with its own public address.
    b.t.host("rogue");
    b.t.veth("rogue", "e0", "isp", "irg");
    b.t.sh(
        "isp",
        "sysctl -qw net.ipv4.conf.irg.proxy_arp=1 net.ipv4.neigh.irg.proxy_delay=0",
    );
    b.t.addr("isp", "irg", "198.51.100.254/32");
    b.t.ip("isp", "route add 198.51.100.3/32 dev irg");
    b.t.addr("rogue", "e0", "198.51.100.3/24");

    // Key flag + key 42, IPv4 payload: the right packet from the wrong source.
    let inner = "4500001c000040004001f0cec0a86610c0a8650a0800f7ff00000000";
    send_gre(&b.t, "rogue", &format!("20000800000000{}{inner}", "2a"));
    // From the real peer with key 43.
    send_gre(&b.t, "br", &format!("20000800000000{}{inner}", "2b"));
    // Keyless from the real peer.
    send_gre(&b.t, "br", &format!("00000800{inner}"));
    // Truncated (key flag but no key), version 1, and a checksum that does not verify.
    send_gre(&b.t, "br", "20000800");
    send_gre(&b.t, "br", "00010800");
    send_gre(&b.t, "br", &format!("a0000800123400000000002a{inner}"));

    wait_until(Duration::from_secs(5), "all six drops counted", || {
        let Some(j) = b.tunnel("hq") else {
            return false;
        };
        let n = |k: &str| counter(&j, &["counters", "drops", k]);
        n("wrong_source") == 1
            && n("wrong_key") == 2
            && n("truncated") == 1
            && n("bad_version") == 1
            && n("bad_checksum") == 1
    });
    assert!(b.hq.as_mut().unwrap().is_running(), "HQ daemon died");
    b.ping("hqpc", BR_PC).expect("tunnel still carries traffic");
    let text = b.show_text("hq").unwrap();
    assert!(text.contains("wrong_key 2"), "{text}");
    assert!(text.contains("wrong_source 1"), "{text}");
}

#[test]
fn wrong_key_wrong_source_and_malformed_gre_are_counted_not_fatal() {
    wrong_key_wrong_source_and_malformed_gre_are_counted_not_fatal_on(e2e!(), "kernel");
}

#[test]
fn wrong_key_source_and_malformed_gre_counted_on_the_tun_path() {
    wrong_key_wrong_source_and_malformed_gre_are_counted_not_fatal_on(e2e!(), "tun");
}

fn gre_in_udp_crosses_the_isp_as_udp_4754_on(t: Topology, datapath: &str) {
    let b = Branches::new(
        t,
        "encap = \"udp\"\nkeepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    b.t.sh("isp", "nft reset counters table inet isp >/dev/null");
    b.ping("hqpc", BR_PC).expect("ping over GRE-in-UDP");
    let dir = b.t.dir().display().to_string();
    b.t.sh(
        "hqpc",
        &format!("head -c 5000000 /dev/urandom > {dir}/sent"),
    );
    let _sink = b.t.spawn(
        "brpc",
        "sink",
        &[
            "socat",
            "-u",
            "TCP-LISTEN:5001,reuseaddr",
            &format!("CREATE:{dir}/received"),
        ],
    );
    b.t.wait_listening("brpc", 5001);
    b.t.sh(
        "hqpc",
        &format!("socat -u FILE:{dir}/sent TCP:{BR_PC}:5001"),
    );
    wait_until(Duration::from_secs(20), "the whole file to arrive", || {
        std::fs::metadata(format!("{dir}/received")).is_ok_and(|m| m.len() == 5_000_000)
    });
    let hash = |f: &str| {
        b.t.sh("hqpc", &format!("sha256sum < {dir}/{f} | cut -d' ' -f1"))
    };
    assert_eq!(hash("sent"), hash("received"));
    // Counted in bytes: with UDP GSO the ISP forwards super-packets, not 1500-byte frames.
    assert!(b.nft_bytes("gre_udp") > 5_000_000);
    assert_eq!(b.nft("gre_raw"), 0, "raw GRE crossed the ISP in UDP mode");
    assert_eq!(b.nft("other"), 0);
    assert_eq!(b.nft("lan_src"), 0);
    // Probes reflected by the peer come back on the UDP port too.
    wait_until(Duration::from_secs(5), "a keepalive reply over UDP", || {
        b.counter("hq", &["counters", "keepalive_replies"]) >= 1
            && b.counter("br", &["counters", "keepalive_replies"]) >= 1
    });
    if datapath == "kernel" {
        // The programs carried it both ways, as UDP tunnel super-packets.
        assert!(b.counter("hq", &["kernel", "tx_bytes"]) > 4_500_000);
        assert!(b.counter("br", &["kernel", "rx_bytes"]) > 4_500_000);
        assert!(
            b.nft("gre_udp") < 3_000,
            "UDP packets: {}",
            b.nft("gre_udp")
        );
    }
}

#[test]
fn gre_in_udp_crosses_the_isp_as_udp_4754() {
    gre_in_udp_crosses_the_isp_as_udp_4754_on(e2e!(), "kernel");
}

#[test]
fn gre_in_udp_crosses_the_isp_as_udp_4754_on_the_tun_path() {
    gre_in_udp_crosses_the_isp_as_udp_4754_on(e2e!(), "tun");
}

/// GRE-in-UDP between a kernel-path end (UDP checksum zero, UDP tunnel super-packets) and a
/// TUN-path end (checksummed datagrams through UDP GSO/GRO): both ways, hash-checked.
#[test]
fn gre_in_udp_kernel_end_and_tun_end_interoperate() {
    let b = Branches::mixed(e2e!(), "encap = \"udp\"\nkey = 7", ["kernel", "tun"]);
    b.ping("hqpc", BR_PC).expect("ping over GRE-in-UDP");
    transfer_is_intact(&b.t, "hqpc", "brpc", BR_PC, 5001, 20_000_000);
    transfer_is_intact(&b.t, "brpc", "hqpc", "192.168.101.10", 5002, 20_000_000);
    assert!(
        b.counter("hq", &["kernel", "tx_bytes"]) > 15_000_000,
        "{}",
        b.tunnel("hq").unwrap()
    );
    for host in ["hqpc", "brpc"] {
        let errors = b.t.sh(
            host,
            "nstat -az TcpInCsumErrors | awk '/TcpInCsumErrors/ {print $2}'",
        );
        assert_eq!(errors.trim(), "0", "{host}: TCP checksum errors");
    }
}

fn reload_adds_a_route_live_without_interrupting_traffic_on(t: Topology, datapath: &str) {
    let b = Branches::new(
        t,
        "keepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    // A second BR LAN that HQ does not route yet.
    b.t.ip("br", "addr add 192.168.112.1/24 dev e1");
    b.t.ip("brpc", "addr add 192.168.112.10/24 dev e0");
    assert!(
        b.t.try_sh("hqpc", "ping -c1 -W1 192.168.112.10").is_err(),
        "the second LAN must not be reachable before the reload"
    );

    // A steady flow across the tunnel for the whole reload: 80 pings, 50 ms apart.
    let mut flow = b.t.spawn(
        "hqpc",
        "flow",
        &["ping", "-c", "80", "-i", "0.05", "-W", "1", BR_PC],
    );
    wait_until(Duration::from_secs(5), "the flow to get going", || {
        flow.log().contains("icmp_seq=5 ")
    });
    let tx_before = b.counter("hq", &["counters", "tx_packets"]);

    let hq_cfg = b.t.dir().join("hq.toml");
    let cfg = std::fs::read_to_string(&hq_cfg).unwrap().replace(
        "routes = [\"192.168.102.0/24\"]",
        "routes = [\"192.168.102.0/24\", \"192.168.112.0/24\"]",
    );
    std::fs::write(&hq_cfg, cfg).unwrap();
    let sock = b.t.dir().join("hq.sock");
    let out =
        b.t.vipgate_output("hq", &["reload", "--control", sock.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("gre: applied live"),
        "reload: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The new route is in the kernel and carries traffic across the tunnel.
    let routes = b.t.ip("hq", "route show 192.168.112.0/24");
    assert!(routes.contains("dev gre-br"), "{routes}");
    wait_until(Duration::from_secs(5), "the new LAN to answer", || {
        b.t.try_sh("hqpc", "ping -c1 -W1 192.168.112.10").is_ok()
    });

    // The old flow lost nothing, and the tunnel was not restarted (counters kept going).
    assert_eq!(
        flow.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        flow.log()
    );
    assert!(
        flow.log().contains("80 received"),
        "pings lost during the reload: {}",
        flow.log()
    );
    assert!(b.counter("hq", &["counters", "tx_packets"]) > tx_before);
    assert!(b.show_text("hq").unwrap().contains("192.168.112.0/24"));
}

#[test]
fn reload_adds_a_route_live_without_interrupting_traffic() {
    reload_adds_a_route_live_without_interrupting_traffic_on(e2e!(), "kernel");
}

#[test]
fn reload_adds_a_route_live_without_interrupting_traffic_on_the_tun_path() {
    reload_adds_a_route_live_without_interrupting_traffic_on(e2e!(), "tun");
}

/// A GRE packet with key 42 around `inner` (hex), as the peer would send it.
fn keyed(inner: &str) -> String {
    format!("200008000000002a{inner}")
}

/// Finding 1.1 end to end: the 33-byte inner packet that used to panic the receive
/// coalescer, then a burst of other malformed inner packets, all from the peer's own
/// underlay address (its namespace, a raw socket). The tunnel keeps carrying traffic, every
/// one of them is counted as `bad_inner`, and no driver task is dead.
fn malformed_inner_packets_from_the_peer_are_counted_and_the_tunnel_survives_on(
    t: Topology,
    datapath: &str,
) {
    let mut b = Branches::new(
        t,
        "key = 42\nkeepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    let ip_tcp = "4500002100000000400600 00c6336402c0a8650a".replace(' ', "");
    let review = format!("{ip_tcp}{}", "00".repeat(13));
    // IPv4 TCP with total length `total`, IHL `ihl`, `len` bytes in all, data offset `doff`.
    let v4 = |len: usize, total: usize, ihl: u8, doff: u8| {
        let mut p = vec![0u8; len];
        p[0] = 0x40 | ihl;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 51, 100, 2]);
        p[16..20].copy_from_slice(&[192, 168, 101, 10]);
        if len > 32 {
            p[32] = doff << 4;
        }
        p.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let v6 = |len: usize, payload: u16| {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let burst = [
        keyed(&review),
        keyed(&v4(39, 39, 5, 5)),                    // 19-byte TCP header
        keyed(&v4(60, 60, 5, 2)),                    // data offset 8
        keyed(&v4(60, 60, 5, 15)),                   // data offset 60 in a 40-byte segment
        keyed(&v4(60, 60, 3, 5)),                    // IHL 3
        keyed(&v4(60, 60, 15, 5)),                   // IHL 15 past the end of the packet
        keyed(&v4(60, 1500, 5, 5)),                  // total length past the packet
        format!("200086dd0000002a{}", v6(53, 13)),   // IPv6 with a 13-byte TCP header
        format!("200086dd0000002a{}", v6(30, 0)),    // truncated IPv6 header
        format!("200086dd0000002a{}", v6(80, 9000)), // IPv6 payload length past the packet
    ];
    for _ in 0..3 {
        for p in &burst {
            send_gre(&b.t, "br", p);
        }
    }
    let expected = 3 * burst.len() as u64;
    wait_until(
        Duration::from_secs(5),
        "every malformed packet counted",
        || b.counter("hq", &["counters", "drops", "bad_inner"]) == expected,
    );
    assert!(b.hq.as_mut().unwrap().is_running(), "HQ daemon died");
    b.ping("hqpc", BR_PC)
        .expect("the tunnel still carries traffic");
    let j = b.tunnel("hq").unwrap();
    assert_eq!(j.get("dead_task"), Some(&Value::Null), "{j}");
    assert_eq!(b.state("hq").as_deref(), Some("up"));
    // Keepalive replies still arrive, so the receive path is alive, not just the kernel.
    let replies = b.counter("hq", &["counters", "keepalive_replies"]);
    wait_until(Duration::from_secs(5), "more keepalive replies", || {
        b.counter("hq", &["counters", "keepalive_replies"]) > replies
    });
}

#[test]
fn malformed_inner_packets_from_the_peer_are_counted_and_the_tunnel_survives() {
    malformed_inner_packets_from_the_peer_are_counted_and_the_tunnel_survives_on(e2e!(), "kernel");
}

#[test]
fn malformed_inner_packets_are_counted_on_the_tun_path() {
    malformed_inner_packets_from_the_peer_are_counted_and_the_tunnel_survives_on(e2e!(), "tun");
}

/// Finding 6.2 end to end: the peer's daemon is gone and an attacker on the peer's
/// underlay address floods keepalive replies (guessed markers, and Cisco-style unmarked
/// ones). HQ still declares the tunnel down and withdraws its routes in time.
fn spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up_on(t: Topology, datapath: &str) {
    let mut b = Branches::new(
        t,
        "key = 42\nkeepalive = { interval = \"1s\", retries = 3 }",
        datapath,
    );
    b.ping("hqpc", BR_PC).expect("ping before the outage");
    let script = b.t.write(
        "spoof.py",
        &format!(
            "import os, socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)\n\
             end = time.time() + 12\n\
             while time.time() < end:\n\
             \x20   s.sendto(bytes.fromhex('200000000000002a') + os.urandom(8), ('{HQ_PUB}', 0))\n\
             \x20   s.sendto(bytes.fromhex('200000000000002a'), ('{HQ_PUB}', 0))\n\
             \x20   time.sleep(0.002)\n"
        ),
    );
    b.br.as_mut().unwrap().terminate(Duration::from_secs(5));
    let stopped = Instant::now();
    let _spoofer =
        b.t.spawn("br", "spoofer", &["python3", script.to_str().unwrap()]);
    wait_until(
        Duration::from_secs(8),
        "HQ tunnel down despite the spoofer",
        || b.state("hq").as_deref() == Some("down"),
    );
    let detected = stopped.elapsed();
    assert!(detected <= Duration::from_secs(6), "took {detected:?}");
    assert!(
        !b.t.ip("hq", "route").contains("192.168.102.0/24"),
        "route still installed while down"
    );
    assert!(
        b.counter("hq", &["counters", "drops", "unexpected_keepalive"]) > 100,
        "spoofed replies were not seen: {}",
        b.counter("hq", &["counters", "drops", "unexpected_keepalive"])
    );
}

#[test]
fn spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up() {
    spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up_on(e2e!(), "kernel");
}

#[test]
fn spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up_on_the_tun_path() {
    spoofed_keepalive_replies_do_not_keep_a_dead_tunnel_up_on(e2e!(), "tun");
}

/// Issue #14: deleting HQ's tunnel interface from outside (`ip link del gre-br`) makes the
/// transmit task's next TUN read fail, so it ends; the supervisor records the death, starts
/// the GRE driver again on a new `gre-br` and the LANs talk again.
fn deleted_tunnel_interface_is_restarted_by_the_supervisor_on(t: Topology, datapath: &str) {
    let b = Branches::new(t, "", datapath);
    b.ping("hqpc", BR_PC).expect("ping before the deletion");

    b.t.ip("hq", "link del gre-br");
    let json = wait_for(Duration::from_secs(20), "the GRE unit restarted", || {
        b.tunnel("hq")
            .filter(|j| j["restarts"].as_u64().is_some_and(|n| n >= 1) && j["state"] != "dead")
    });
    let cause = json["last_death"].as_str().unwrap_or_default();
    assert!(
        cause.contains("GRE transmit failed: tunnel gre-br"),
        "{json}"
    );
    b.wait_up("hq");
    wait_for(Duration::from_secs(10), "traffic after the restart", || {
        b.ping("hqpc", BR_PC).ok()
    });
    assert!(
        b.t.ip("hq", "route")
            .contains("192.168.102.0/24 dev gre-br"),
        "route not reinstalled"
    );
}

#[test]
fn deleted_tunnel_interface_is_restarted_by_the_supervisor() {
    deleted_tunnel_interface_is_restarted_by_the_supervisor_on(e2e!(), "kernel");
}

#[test]
fn deleted_tunnel_interface_is_restarted_by_the_supervisor_on_the_tun_path() {
    deleted_tunnel_interface_is_restarted_by_the_supervisor_on(e2e!(), "tun");
}

/// A sequenced tunnel asks for no data path: it runs on the TUN path and says why.
#[test]
fn a_sequenced_tunnel_runs_on_the_tun_path_and_says_why() {
    let b = Branches::new(e2e!(), "sequence = true", "");
    let j = b.tunnel("hq").unwrap();
    assert_eq!(j["datapath"], "tun", "{j}");
    let reason = j["datapath_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("sequence = true"), "{j}");
    b.ping("hqpc", BR_PC)
        .expect("ping across the sequenced tunnel");
    let text = b.show_text("hq").unwrap();
    assert!(text.contains("data path: tun (sequence = true"), "{text}");
}

/// A stop takes the kernel path's programs off the underlay interface (no qdisc or filter
/// left; kpath's own tests check the tcx links and programs), and a new start puts them back.
#[test]
fn stopping_the_kernel_path_leaves_nothing_behind() {
    let mut b = Branches::new(e2e!(), "", "kernel");
    b.ping("hqpc", BR_PC).expect("ping on the kernel path");
    let text = b.show_text("hq").unwrap();
    assert!(text.contains("data path: kernel"), "{text}");
    assert!(text.contains("kernel carried tx"), "{text}");

    b.hq.as_mut().unwrap().terminate(Duration::from_secs(5));
    assert!(!b.t.sh("hq", "tc qdisc show dev e0").contains("clsact"));
    assert!(
        b.t.sh("hq", "tc filter show dev e0 ingress")
            .trim()
            .is_empty()
    );
    assert!(!b.t.ip("hq", "link").contains("gre-br"), "TUN device left");

    b.start("hq");
    b.wait_up("hq");
    assert_eq!(b.tunnel("hq").unwrap()["datapath"], "kernel");
    wait_for(Duration::from_secs(5), "traffic after the restart", || {
        b.ping("hqpc", BR_PC).ok()
    });
}
