//! `[sync]`: flow sync between the nodes of a VRRP pair (keepalived's `lvs_sync_daemon`,
//! conntrackd in FTFW mode).
//!
//! What is checked here, so that `vipgate check` finds it before `vipgate run` does: either
//! `peers` or a multicast `group`, not both; the peers are unicast addresses (at most
//! [`flowsync::wire::MAX_PEERS`], none twice, not our own), the group a multicast one,
//! the local address is one a node id can be derived from, the key file is usable and private
//! (as OpenSSH's StrictModes treats a private key), the VRRP instance exists, and the site has
//! flows to sync (`[nat]` or `[[service]]`).
//!
//! With `[nat]` (a PAT gateway pair) the overload address must move with the flows: it is
//! the public endpoint of every synced dynamic flow, so it has to be an address of the
//! instance `[sync] vrrp` follows, or of an instance in the same VRRP sync group (`group`),
//! which changes state together with it. An overload address no `[[vrrp]]` moves would be
//! live on both gateways at once (both answering ARP for it); one moved by an instance of
//! another group could move without the flows being promoted. Both are refused.

use super::vrrp::VrrpSection;
use super::{HumanDuration, Validator, check_unique, did_you_mean};
use flowsync::wire::{MAX_KEY_LEN, MAX_PEERS, MIN_KEY_LEN};
use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The default UDP port. It sits next to 8848, the LVS sync daemon's port, so a firewall rule
/// written for "director state sync" finds both, but is not the same: a keepalived sync daemon
/// on the same link never takes vipgate's datagrams for its own (each side would only count
/// the other's as malformed, but an operator reading a capture should not have to guess).
pub(crate) const DEFAULT_PORT: u16 = 8849;

/// `[sync]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SyncSection {
    /// The other nodes' sync addresses (unicast; every message goes to each). Either this or
    /// `group`.
    #[serde(default = "d_peers")]
    pub(crate) peers: Spanned<Vec<Spanned<Ipv4Addr>>>,
    /// A multicast group every node joins on the interface holding `listen` (as the LVS sync
    /// daemon and conntrackd's `Multicast` do): each message is sent once, with TTL 1, and
    /// the peers are whoever sends with the group's key (at most 16). Either this or `peers`.
    #[serde(default)]
    pub(crate) group: Option<Spanned<Ipv4Addr>>,
    /// This node's sync address: the socket binds it, the peers list it, and this node's id
    /// in the sync group is derived from it.
    pub(crate) listen: Spanned<Ipv4Addr>,
    /// UDP port, the same on every node. Default [`DEFAULT_PORT`].
    #[serde(default = "d_port")]
    pub(crate) port: Spanned<u16>,
    /// The group's shared key: the file's bytes as they are, 16 to 1024 of them, readable by
    /// its owner only.
    pub(crate) key_file: Spanned<PathBuf>,
    /// The VRRP instance whose MASTER state makes this node the one that streams its flows,
    /// and whose transition to MASTER makes the standby flows live.
    pub(crate) vrrp: Spanned<String>,
    /// How long the `vrrp` instance, back as backup, waits for the master's snapshot before
    /// it may preempt anyway (so a dead sync never blocks fail-back for good). Default 30 s.
    #[serde(default = "d_ready_timeout")]
    pub(crate) ready_timeout: Spanned<HumanDuration>,
}

fn d_peers() -> Spanned<Vec<Spanned<Ipv4Addr>>> {
    Spanned::new(0..0, Vec::new())
}

fn d_port() -> Spanned<u16> {
    Spanned::new(0..0, DEFAULT_PORT)
}

fn d_ready_timeout() -> Spanned<HumanDuration> {
    Spanned::new(0..0, HumanDuration(std::time::Duration::from_secs(30)))
}

impl SyncSection {
    /// `vrrp`: the site's instances, `None` when `[[vrrp]]` did not parse (the reference is
    /// then not checked). `has_flows`: the site has `[nat]` or `[[service]]`.
    pub(crate) fn validate(
        &self,
        vrrp: Option<&[VrrpSection]>,
        has_flows: bool,
        v: &mut Validator,
    ) {
        super::duration::check_at_least(
            &self.ready_timeout,
            std::time::Duration::from_secs(1),
            "ready_timeout",
            v,
        );
        super::duration::check_at_most(
            &self.ready_timeout,
            std::time::Duration::from_secs(3600),
            "ready_timeout",
            v,
        );
        let listen = *self.listen.get_ref();
        if !is_unicast(listen) {
            v.error_at(
                &self.listen,
                format!("`listen` = {listen}: a unicast address of this node is needed (the node's id in the sync group is derived from it)"),
            );
        }
        if *self.port.get_ref() == 0 {
            v.error_at(&self.port, "`port` must be 1..=65535");
        }
        let peers = self.peers.get_ref();
        match &self.group {
            None if peers.is_empty() => v.error_at(
                &self.peers,
                "`peers` is empty: list the other nodes' sync addresses, or set a multicast `group`",
            ),
            Some(g) if !peers.is_empty() => v.error_at(
                g,
                "`group` and `peers` both set: sync goes to a multicast group or to listed peers, not both",
            ),
            Some(g) if !g.get_ref().is_multicast() => v.error_at(
                g,
                format!(
                    "`group` = {}: not a multicast address (224.0.0.0/4; e.g. 239.192.88.49)",
                    g.get_ref()
                ),
            ),
            _ => {}
        }
        if peers.len() > MAX_PEERS {
            v.error_at(
                &self.peers,
                format!("{} peers: at most {MAX_PEERS}", peers.len()),
            );
        }
        for p in peers {
            let a = *p.get_ref();
            if !is_unicast(a) {
                v.error_at(p, format!("peer {a} is not a unicast address"));
            } else if a == listen {
                v.error_at(p, format!("peer {a} is this node's own `listen` address"));
            }
        }
        check_unique(
            peers.iter().map(|p| (*p.get_ref(), p.span())),
            "sync peer",
            v,
        );
        if let Err(e) = read_key(self.key_file.get_ref()) {
            v.error_at(&self.key_file, format!("`key_file`: {e}"));
        }
        if let Some(instances) = vrrp {
            let name = self.vrrp.get_ref();
            if !instances.iter().any(|i| i.name.get_ref() == name) {
                let names: Vec<&str> = instances
                    .iter()
                    .map(|i| i.name.get_ref().as_str())
                    .collect();
                v.error_at(
                    &self.vrrp,
                    format!(
                        "no [[vrrp]] instance `{name}`{}: sync follows a VRRP instance's mastership",
                        did_you_mean(name, &names)
                    ),
                );
            }
        }
        if !has_flows {
            v.error_at(
                &self.listen,
                "[sync] needs [nat] or [[service]]: it syncs their flows",
            );
        }
    }

    /// The PAT pair's rule (module docs): `[nat]`'s overload address moves with the instance
    /// this section follows. `vrrp`: the site's instances (parsed).
    pub(crate) fn validate_pat_pair(
        &self,
        overload: Ipv4Addr,
        vrrp: &[VrrpSection],
        v: &mut Validator,
    ) {
        let name = self.vrrp.get_ref();
        let Some(followed) = vrrp.iter().find(|i| i.name.get_ref() == name) else {
            // Reported by `validate`.
            return;
        };
        let holder = vrrp
            .iter()
            .find(|i| i.addresses.get_ref().iter().any(|a| a.addr() == overload));
        match holder {
            None => v.error_at(
                &self.vrrp,
                format!(
                    "[nat] address {overload} is in no [[vrrp]] instance's `addresses`: a PAT pair with [sync] must move its overload address with VRRP (listed by `{name}` or an instance of its group), or both gateways answer for it"
                ),
            ),
            Some(h) => {
                let same_group = h.group.is_some() && h.group == followed.group;
                if h.name.get_ref() != name && !same_group {
                    v.error_at(
                        &self.vrrp,
                        format!(
                            "[nat] address {overload} is moved by [[vrrp]] `{}`, which is neither `{name}` nor in its `group`: the flows would be promoted when `{name}` changes state, not when the address moves",
                            h.name.get_ref()
                        ),
                    );
                }
            }
        }
    }

    /// This node's id in the sync group: its `listen` address (non-zero, as validated).
    pub(crate) fn node_id(&self) -> Option<std::num::NonZeroU32> {
        std::num::NonZeroU32::new(u32::from(*self.listen.get_ref()))
    }
}

fn is_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a.is_broadcast())
}

/// Reads a sync key file, refusing what OpenSSH's StrictModes refuses for a private key (a
/// file others can read or write) and what the protocol cannot use (fewer than 16 or more
/// than 1024 bytes). The key is the file's bytes as they are, a trailing newline included:
/// every node reads the same file.
///
/// # Errors
/// Why the file cannot be the key, as a message for `vipgate check`.
pub(crate) fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: a key others can read or write is no secret; chmod 600 it",
            path.display()
        ));
    }
    let mut key = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_LEN as u64 + 1).read_to_end(&mut key))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "{} holds {} bytes: a key has at least {MIN_KEY_LEN} (e.g. head -c 32 /dev/urandom > FILE)",
            path.display(),
            key.len()
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "{} holds more than {MAX_KEY_LEN} bytes: a key has at most {MAX_KEY_LEN}",
            path.display()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(bytes).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn keys_are_refused_as_strict_modes_would() {
        let dir = std::env::temp_dir().join(format!("vipgate-synckey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let dir = dir.as_path();
        let good = key_file(dir, "good", &[7u8; 32], 0o600);
        assert_eq!(read_key(&good), Ok(vec![7u8; 32]));
        let open = key_file(dir, "open", &[7u8; 32], 0o644);
        assert!(read_key(&open).unwrap_err().contains("mode 0644"));
        let group = key_file(dir, "group", &[7u8; 32], 0o640);
        assert!(read_key(&group).unwrap_err().contains("chmod 600"));
        let short = key_file(dir, "short", b"too short", 0o600);
        assert!(read_key(&short).unwrap_err().contains("9 bytes"));
        let long = key_file(dir, "long", &[1u8; 1025], 0o400);
        assert!(read_key(&long).unwrap_err().contains("more than 1024"));
        assert!(read_key(&dir.join("missing")).is_err());
        assert!(read_key(dir).unwrap_err().contains("not a regular file"));
        let _ = std::fs::remove_dir_all(dir);
    }

    const SITE: &str = r#"[[service]]
name = "web"
listen = "198.51.100.10:80"
backends = [{ address = "10.0.0.101:80" }]

[[vrrp]]
name = "vip-web"
interface = "eth0"
vrid = 51
addresses = ["198.51.100.10/24"]

[sync]
peers = ["10.0.0.12"]
listen = "10.0.0.11"
key_file = "KEY"
vrrp = "vip-web"
"#;

    fn errors(text: &str) -> Vec<String> {
        match crate::config::parse(Path::new("site.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn a_valid_section_parses_with_the_default_port() {
        let dir = std::env::temp_dir().join(format!("vipgate-syncsite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = key_file(&dir, "key", &[9u8; 32], 0o600);
        let text = SITE.replace("KEY", &key.display().to_string());
        let site = crate::config::parse(Path::new("site.toml"), &text).expect("valid");
        let sync = site.sync.expect("[sync]");
        assert_eq!(*sync.port.get_ref(), DEFAULT_PORT);
        assert_eq!(
            sync.node_id().map(std::num::NonZeroU32::get),
            Some(u32::from(Ipv4Addr::new(10, 0, 0, 11)))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_mistake_is_reported_at_its_place() {
        let text = SITE
            .replace(
                r#"peers = ["10.0.0.12"]"#,
                r#"peers = ["10.0.0.12", "224.0.0.18", "10.0.0.12", "10.0.0.11"]"#,
            )
            .replace(r#"vrrp = "vip-web""#, "vrrp = \"vip-wbe\"\nport = 0")
            .replace("KEY", "/nonexistent/vipgate-sync.key");
        let errs = errors(&text);
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let peers = line_of("peers = [");
        let expect = [
            (peers, "peer 224.0.0.18 is not a unicast address"),
            (peers, "duplicate sync peer `10.0.0.12`"),
            (peers, "peer 10.0.0.11 is this node's own `listen` address"),
            (
                line_of("key_file"),
                "`key_file`: /nonexistent/vipgate-sync.key",
            ),
            (
                line_of("vip-wbe"),
                "no [[vrrp]] instance `vip-wbe` (did you mean `vip-web`?)",
            ),
            (line_of("port = 0"), "`port` must be 1..=65535"),
        ];
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        for (line, message) in expect {
            assert!(
                errs.iter()
                    .any(|e| e.starts_with(&format!("site.toml:{line}:")) && e.contains(message)),
                "{message} at line {line}: {errs:#?}"
            );
        }
    }

    const PAT_PAIR: &str = r#"[nat]
inside = ["eth1"]
outside = "eth0"
address = "198.51.100.10"

[[vrrp]]
name = "outside"
group = "hq"
interface = "eth0"
vrid = 61
addresses = ["198.51.100.10/24"]

[[vrrp]]
name = "inside"
group = "hq"
interface = "eth1"
vrid = 62
addresses = ["192.168.101.1/24"]

[sync]
peers = ["10.9.0.2"]
listen = "10.9.0.1"
key_file = "KEY"
vrrp = "inside"
"#;

    #[test]
    fn a_pat_pair_moves_its_overload_address_with_the_followed_group() {
        let dir = std::env::temp_dir().join(format!("vipgate-syncpat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = key_file(&dir, "key", &[9u8; 32], 0o600);
        let text = PAT_PAIR.replace("KEY", &key.display().to_string());
        // Following the inside instance works: the outside one is in its group.
        assert_eq!(errors(&text), Vec::<String>::new());
        let line = text.lines().position(|l| l.starts_with("vrrp =")).unwrap() + 1;
        // Another group: the address would move without the flows.
        let split = text.replacen(r#"group = "hq""#, r#"group = "other""#, 1);
        let errs = errors(&split);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("site.toml:{line}:"))
                && errs[0].contains("moved by [[vrrp]] `outside`, which is neither `inside`"),
            "{errs:#?}"
        );
        // No instance moves it: both gateways would answer for it.
        let fixed = text.replace(
            r#"addresses = ["198.51.100.10/24"]"#,
            r#"addresses = ["198.51.100.11/24"]"#,
        );
        let errs = errors(&fixed);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(&format!("site.toml:{line}:"))
                && errs[0].contains("is in no [[vrrp]] instance's `addresses`"),
            "{errs:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_multicast_group_replaces_the_peers() {
        let dir = std::env::temp_dir().join(format!("vipgate-syncgroup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = key_file(&dir, "key", &[9u8; 32], 0o600);
        let text = SITE
            .replace(r#"peers = ["10.0.0.12"]"#, r#"group = "239.192.88.49""#)
            .replace("KEY", &key.display().to_string());
        let site = crate::config::parse(Path::new("site.toml"), &text).expect("valid");
        let sync = site.sync.expect("[sync]");
        assert_eq!(
            sync.group.map(|g| *g.get_ref()),
            Some(Ipv4Addr::new(239, 192, 88, 49))
        );
        let both = SITE
            .replace(
                r#"peers = ["10.0.0.12"]"#,
                "peers = [\"10.0.0.12\"]\ngroup = \"239.192.88.49\"",
            )
            .replace("KEY", &key.display().to_string());
        let errs = errors(&both);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("site.toml:14:") && e.contains("both set")),
            "{errs:#?}"
        );
        let unicast = text.replace("239.192.88.49", "10.0.0.99");
        let errs = errors(&unicast);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("site.toml:13:") && e.contains("not a multicast address")),
            "{errs:#?}"
        );
        let neither = text.replace("group = \"239.192.88.49\"\n", "");
        let errs = errors(&neither);
        assert!(
            errs.iter()
                .any(|e| e.contains("or set a multicast `group`")),
            "{errs:#?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sync_needs_flows_and_a_bounded_peer_list() {
        let peers: Vec<String> = (1..=17).map(|i| format!("\"10.0.1.{i}\"")).collect();
        let text = SITE
            .replace(r#"["10.0.0.12"]"#, &format!("[{}]", peers.join(", ")))
            .replace("KEY", "/nonexistent/k");
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.contains("17 peers: at most 16")),
            "{errs:#?}"
        );
        let no_service = text
            .split("[[vrrp]]")
            .nth(1)
            .map(|rest| format!("[[vrrp]]{rest}"))
            .expect("vrrp section");
        let errs = errors(&no_service);
        assert!(
            errs.iter()
                .any(|e| e.contains("[sync] needs [nat] or [[service]]")),
            "{errs:#?}"
        );
    }
}
