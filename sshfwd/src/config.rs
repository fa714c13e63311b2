//! What the forwarding client and server are configured with, and what they report.
//!
//! Pure data: the CLI lowers its flags, `-o`, `-F` files and TOML sections into these types
//! without the `driver` feature, and [`crate::ReloadPlan`] diffs two [`ClientConfig`]s. Only
//! the driver (`SshClient`, `SshServer`) opens sockets with them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::known_hosts::{self, StrictHostKeyChecking};
use crate::options::{AddressFamily, AlgorithmList};
use crate::policy::PermitList;
use crate::spec::{DynamicSpec, ForwardSpec, LocalForward};
use crate::startups::{MaxStartups, NetBlock};

/// Everything one destination needs; the CLI builds it from flags, `-o`, `-F` or `[[ssh]]`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name shown in status and logs (`ops@host:22`).
    pub name: String,
    /// Host to connect to (also the name looked up in known_hosts).
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Identity files tried in order.
    pub identities: Vec<PathBuf>,
    /// `CertificateFile`: user certificates, each offered with the identity it certifies
    /// (an identity's `-cert.pub` is picked up without being listed).
    pub certificates: Vec<PathBuf>,
    /// Passphrase for encrypted identity files.
    pub passphrase: Option<String>,
    /// Also try the keys of the ssh-agent at `SSH_AUTH_SOCK`.
    pub use_agent: bool,
    /// known_hosts file read and (with accept-new) appended to.
    pub known_hosts: PathBuf,
    /// Unknown-host policy; a changed key is always refused.
    pub strict_host_key_checking: StrictHostKeyChecking,
    /// `-L` forwards.
    pub local: Vec<ForwardSpec>,
    /// `-R` forwards.
    pub remote: Vec<ForwardSpec>,
    /// `-D` forwards.
    pub dynamic: Vec<DynamicSpec>,
    /// Listeners without a bind address listen on all addresses instead of loopback.
    pub gateway_ports: bool,
    /// Keepalive probe interval (`ServerAliveInterval`); `None` disables.
    pub server_alive_interval: Option<Duration>,
    /// Unanswered probes before the connection is declared dead (`ServerAliveCountMax`).
    pub server_alive_count_max: u32,
    /// A remote forward the server refuses fails the start.
    pub exit_on_forward_failure: bool,
    /// Cipher preference (OpenSSH names); empty keeps russh's default order.
    pub ciphers: Vec<String>,
    /// `KexAlgorithms`, `MACs`, `HostKeyAlgorithms` applied to russh's defaults.
    pub algorithms: Algorithms,
    /// Which address families the destination is resolved to (`AddressFamily`, `-4`, `-6`).
    pub address_family: AddressFamily,
    /// Local address the SSH connection leaves from (`BindAddress`).
    pub bind_address: Option<std::net::IpAddr>,
    /// The ssh-agent socket (`IdentityAgent`); `None` uses `SSH_AUTH_SOCK`.
    pub agent_socket: Option<PathBuf>,
    /// `ProxyJump` hops, first connected first; the destination is reached through the last.
    pub jump: Vec<JumpHop>,
    /// Reconnect schedule.
    pub backoff: BackoffConfig,
    /// SSH connections to keep; channels are spread over them round-robin. 1 = OpenSSH-like.
    pub connections: usize,
    /// Limit for TCP connect + handshake, and for a local client waiting for a reconnect.
    pub connect_timeout: Duration,
    /// If the first connection fails, `start` returns the error (the CLI); otherwise it keeps
    /// retrying in the background (a daemon).
    pub fail_fast: bool,
    /// End-to-end probes (autossh's `-M` idea): every interval, a channel is opened through
    /// each `-L` to its target and through each `-R` back to this side; one that fails or
    /// takes longer than `connect_timeout` reconnects the session. `None` disables.
    pub probe_interval: Option<Duration>,
    /// What the probes reach through `-D` forwards, which have no target of their own: a
    /// `direct-tcpip` channel to this `host:port` through every connection. `None`: `-D`
    /// forwards are watched by keepalives only.
    pub probe_target: Option<(String, u16)>,
    /// `PasswordAuthentication`: after the keys, try passwords from `prompt`.
    pub password_authentication: bool,
    /// `KbdInteractiveAuthentication`: after the keys, answer the server's prompts from
    /// `prompt` (tried before passwords, as ssh's `PreferredAuthentications`).
    pub kbd_interactive_authentication: bool,
    /// Where passwords come from: a terminal (`vipgate ssh`) or a `password_file`; `None`
    /// (a daemon without one) never tries either method.
    pub prompt: Option<Prompt>,
}

/// Answers password and keyboard-interactive prompts during authentication. Called on a
/// blocking thread, so it may wait for a human.
pub trait PasswordPrompt: Send + Sync {
    /// The password of `who` (`user@host`); `None` gives up.
    fn password(&self, who: &str) -> Option<String>;
    /// One answer per prompt (its text, and whether the answer may be echoed) of a
    /// keyboard-interactive round titled `name` with `instructions`; `None` gives up.
    fn keyboard_interactive(
        &self,
        who: &str,
        name: &str,
        instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>>;
}

/// A [`PasswordPrompt`] and what it is (`terminal`, `file /etc/vipgate/pw`): two prompts are
/// the same source when they say so, which is what a reload compares.
#[derive(Clone)]
pub struct Prompt {
    /// What answers, for logs and reloads.
    pub source: String,
    /// The answering side.
    pub answer: std::sync::Arc<dyn PasswordPrompt>,
}

impl std::fmt::Debug for Prompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Prompt({})", self.source)
    }
}

impl PartialEq for Prompt {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl ClientConfig {
    /// A config with OpenSSH's defaults for everything but the destination.
    #[must_use]
    pub fn new(host: &str, port: u16, user: &str, known_hosts: PathBuf) -> Self {
        ClientConfig {
            name: format!("{user}@{}", known_hosts::host_field(host, port)),
            host: host.to_string(),
            port,
            user: user.to_string(),
            identities: Vec::new(),
            certificates: Vec::new(),
            passphrase: None,
            use_agent: true,
            known_hosts,
            strict_host_key_checking: StrictHostKeyChecking::AcceptNew,
            local: Vec::new(),
            remote: Vec::new(),
            dynamic: Vec::new(),
            gateway_ports: false,
            server_alive_interval: Some(Duration::from_secs(15)),
            server_alive_count_max: 3,
            exit_on_forward_failure: true,
            ciphers: Vec::new(),
            algorithms: Algorithms::default(),
            address_family: AddressFamily::Any,
            bind_address: None,
            agent_socket: None,
            jump: Vec::new(),
            backoff: BackoffConfig::default(),
            connections: 1,
            connect_timeout: Duration::from_secs(10),
            fail_fast: true,
            probe_interval: None,
            probe_target: None,
            password_authentication: true,
            kbd_interactive_authentication: true,
            prompt: None,
        }
    }

    /// The forwards that listen on this side, `-L` first, then `-D`, in config order.
    #[must_use]
    pub fn local_forwards(&self) -> Vec<LocalForward> {
        let local = self.local.iter().cloned().map(LocalForward::Local);
        let dynamic = self.dynamic.iter().cloned().map(LocalForward::Dynamic);
        local.chain(dynamic).collect()
    }

    /// `ServerAliveInterval` / `ServerAliveCountMax`.
    #[must_use]
    pub fn keepalive(&self) -> Keepalive {
        Keepalive {
            interval: self.server_alive_interval,
            count_max: self.server_alive_count_max,
        }
    }
}

/// One `ProxyJump` hop, resolved through the config files like a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHop {
    /// Address or name to connect to (also the known_hosts name).
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Identity files tried in order (the agent's keys too, as for the destination).
    pub identities: Vec<PathBuf>,
}

/// Algorithm restrictions in OpenSSH syntax; `None` keeps russh's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Algorithms {
    /// `KexAlgorithms`.
    pub kex: Option<AlgorithmList>,
    /// `MACs`.
    pub macs: Option<AlgorithmList>,
    /// `HostKeyAlgorithms`.
    pub host_keys: Option<AlgorithmList>,
}

/// `ServerAliveInterval` / `ServerAliveCountMax`: the one connection setting a reload changes
/// without reconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Probe interval; `None` (or zero) disables probing.
    pub interval: Option<Duration>,
    /// Unanswered probes in a row before the connection is declared dead.
    pub count_max: u32,
}

/// Which way a forward goes, as `ssh -L`, `-R` and `-D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum ForwardKind {
    /// `-L`: a local listener, connections go to a target through the server.
    Local,
    /// `-R`: the server listens, connections come back to a local target.
    Remote,
    /// `-D`: a local SOCKS listener.
    Dynamic,
}

impl ForwardKind {
    /// The word `show ssh` prints.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardKind::Local => "local",
            ForwardKind::Remote => "remote",
            ForwardKind::Dynamic => "dynamic",
        }
    }
}

/// Monotonic counts of one forward (`counters` in `show ssh --json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ForwardCounts {
    /// Connections since start.
    pub total: u64,
    /// Connections that could not be forwarded.
    pub failed: u64,
    /// Bytes sent into the tunnel by closed connections.
    pub bytes_out: u64,
    /// Bytes received from the tunnel by closed connections.
    pub bytes_in: u64,
}

/// A snapshot of one forward for `vipgate show ssh`; with the `serde` feature its
/// serialisation is the forward's entry in `show ssh --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ForwardStatus {
    /// `-L`, `-R` or `-D`.
    pub kind: ForwardKind,
    /// The spec as given (`8585:127.0.0.1:80`).
    pub spec: String,
    /// Where it actually listens (`127.0.0.1:8585`, or on the server for `-R`); empty while
    /// a remote forward is not established.
    pub bound: String,
    /// Connections now open.
    pub active: u64,
    /// Monotonic counts.
    pub counters: ForwardCounts,
    /// Listening, refused and being retried (`-R`), or down with the connection (`-R`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub state: ForwardState,
    /// Why a `pending` forward is not listening and when it is asked for again.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub pending: Option<PendingForward>,
}

/// Where a forward stands (`state` in `show ssh --json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum ForwardState {
    /// Accepting connections (a local listener, or a `-R` the server accepted).
    #[default]
    Listening,
    /// A `-R` the server refused on the live connection; asked for again with backoff.
    Pending,
    /// A `-R` whose connection is down; asked for again when it is back.
    Down,
}

impl ForwardState {
    /// The word `show ssh` prints.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardState::Listening => "listening",
            ForwardState::Pending => "pending",
            ForwardState::Down => "down",
        }
    }
}

/// A `-R` the server refused on the live connection (`pending` in `show ssh --json`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PendingForward {
    /// ssh's wording: `remote port forwarding failed for listen port 9100`.
    pub reason: String,
    /// Requests refused on this connection so far.
    pub attempts: u64,
    /// Time until the next request (whole seconds in JSON, `next_retry_s`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "next_retry_s", with = "crate::serde_secs")
    )]
    pub next_retry: Option<Duration>,
}

/// Where a destination's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum TunnelState {
    /// At least one SSH connection is up.
    Connected,
    /// None is up; the next attempt is under way or waiting for its backoff.
    Connecting,
    /// Stopped on request.
    Stopped,
}

impl TunnelState {
    /// The word `show ssh` prints.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Connected => "connected",
            TunnelState::Connecting => "connecting",
            TunnelState::Stopped => "stopped",
        }
    }
}

/// Monotonic counts of a destination (`counters` in `show ssh --json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClientCounts {
    /// Reconnections since start.
    pub reconnects: u64,
    /// End-to-end probes of single forwards since start (see `ClientConfig::probe_interval`).
    #[cfg_attr(feature = "serde", serde(default))]
    pub probes: u64,
    /// Probes that failed or timed out; each one reconnected the session.
    #[cfg_attr(feature = "serde", serde(default))]
    pub probe_failures: u64,
}

/// A snapshot of a destination for `vipgate show ssh`; with the `serde` feature its
/// serialisation is the destination's entry in `show ssh --json` (the uptime as whole
/// seconds, `uptime_s`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SshClientStatus {
    /// Config name.
    pub name: String,
    /// Connected, connecting or stopped.
    pub state: TunnelState,
    /// Time since the current connection came up.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "uptime_s", with = "crate::serde_secs")
    )]
    pub uptime: Option<Duration>,
    /// Monotonic counts.
    pub counters: ClientCounts,
    /// SSH connections now up (of `connections`).
    pub connections_up: usize,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// Every forward.
    pub forwards: Vec<ForwardStatus>,
}

/// Fired when the server allocates a port for a `-R ...:0:...` forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedPort {
    /// The allocated port on the server.
    pub port: u16,
    /// Where connections to it go (`host:port` or a socket path).
    pub target: String,
}

/// What `vipgate sshd` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Host key (OpenSSH private key format); an ed25519 key is generated here if absent.
    pub host_key: PathBuf,
    /// authorized_keys file, re-read on each login.
    pub authorized_keys: PathBuf,
    /// `TrustedUserCAKeys`: a file of CA public keys (one per line, no options) whose user
    /// certificates log in a user named among their principals; re-read on each login.
    pub trusted_user_ca_keys: Option<PathBuf>,
    /// `HostCertificate`: an OpenSSH host certificate for `host_key`, presented to clients
    /// that ask for one.
    pub host_certificate: Option<PathBuf>,
    /// Targets clients may open (`PermitOpen`).
    pub permit_open: PermitList,
    /// Addresses clients may listen on (`PermitListen`).
    pub permit_listen: PermitList,
    /// Unix socket paths clients may listen on (`ssh -R /path:...`); empty refuses every
    /// `streamlocal-forward@openssh.com`.
    pub permit_listen_paths: crate::sockpath::PathPermit,
    /// Unix sockets clients may connect to (`ssh -L ...:/path`); empty refuses every
    /// `direct-streamlocal@openssh.com`.
    pub permit_open_paths: crate::sockpath::PathPermit,
    /// Mode of the sockets created for `-R /path` (`StreamLocalBindMask 0177` gives 0600,
    /// the default).
    pub socket_mode: u32,
    /// Remote forwards may bind the address the client asks for; otherwise loopback only
    /// (sshd's `GatewayPorts no`).
    pub gateway_ports: bool,
    /// Drop clients that send nothing for this long (keepalives count).
    pub idle_timeout: Option<Duration>,
    /// Caps and timeouts against floods and greedy clients.
    pub limits: ServerLimits,
}

/// Caps and timeouts; the defaults are OpenSSH's where it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// `LoginGraceTime`: a connection not authenticated by then is closed. Default 30 s.
    pub login_grace_time: Duration,
    /// `MaxStartups`. Default 10:30:100.
    pub max_startups: MaxStartups,
    /// `PerSourceMaxStartups`: pending connections per source network. Default 10.
    pub per_source_max_startups: Option<u32>,
    /// `PerSourceNetBlockSize`. Default 32:128.
    pub per_source_netblock: NetBlock,
    /// Forwarded channels (direct-tcpip and forwarded-tcpip) open at once in one session.
    /// Default 256.
    pub max_channels_per_session: u32,
    /// `-R` listeners of one session. Default 16.
    pub max_listeners_per_session: u32,
    /// Forwarded channels open at once in the whole server. Default 4,096.
    pub max_channels: u32,
    /// `-R` listeners in the whole server. Default 256.
    pub max_listeners: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            login_grace_time: Duration::from_secs(30),
            max_startups: MaxStartups::default(),
            per_source_max_startups: Some(10),
            per_source_netblock: NetBlock::default(),
            max_channels_per_session: 256,
            max_listeners_per_session: 16,
            max_channels: 4096,
            max_listeners: 256,
        }
    }
}

/// Monotonic counts of the server (`counters` in `show ssh --json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ServerCounts {
    /// Accepted logins.
    pub logins: u64,
    /// Refused keys.
    pub auth_refused: u64,
    /// Refused forward requests.
    pub forwards_refused: u64,
    /// Forwarded channels since start.
    pub channels_total: u64,
    /// Bytes client→target.
    pub bytes_out: u64,
    /// Bytes target→client.
    pub bytes_in: u64,
    /// Refused by `max_startups`.
    pub refused_max_startups: u64,
    /// Refused by `per_source_max_startups`.
    pub refused_per_source: u64,
    /// Closed at `login_grace_time`.
    pub login_grace_expired: u64,
    /// Channels refused by a cap.
    pub channels_refused: u64,
    /// `-R` listeners refused by a cap.
    pub listeners_refused: u64,
    /// accept() errors.
    pub accept_errors: u64,
}

/// A snapshot of the server; with the `serde` feature its serialisation is the server's
/// entry in `show ssh --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ServerStatus {
    /// Bound address.
    pub listen: String,
    /// `SHA256:...` of the host key.
    pub fingerprint: String,
    /// Open sessions.
    pub sessions: u64,
    /// Open forwarded channels.
    pub channels_active: u64,
    /// Connections not yet authenticated.
    pub pending: u64,
    /// Monotonic counts.
    pub counters: ServerCounts,
}
