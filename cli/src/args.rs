//! Command-line interface (clap derive). Help texts say what a user can do with each command.

use crate::parts::Kind;
use crate::parts::ssh::{SshArgs, SshdArgs};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// vipgate: GRE tunnels, PAT, VRRP failover, load-balanced virtual services and SSH
/// forwarding from one TOML file.
#[derive(Debug, Parser)]
#[command(name = "vipgate", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where to find a running daemon's control socket.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ControlArgs {
    /// Control socket path (default: `[daemon] control` of --config, else /run/vipgate/vipgate.sock).
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    /// Site config to read the control socket path from.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Validate a site config: every mistake as FILE:LINE:COL on stderr (exit 1), or a summary (exit 0).
    Check {
        /// The site config (TOML).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Print nothing; only the exit code tells whether the file is valid.
        #[arg(short, long, conflicts_with = "dump")]
        quiet: bool,
        /// Print the effective config, every default filled in, as TOML instead of the summary.
        #[arg(long)]
        dump: bool,
        /// Also check the file against this host, as `vipgate run` does (a direct-routing
        /// service's real servers on a directly connected network).
        #[arg(long)]
        host: bool,
    },
    /// Run every part the config describes, in the foreground (SIGHUP re-reads, SIGTERM stops cleanly).
    Run {
        /// The site config (TOML).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Start only these parts (e.g. `--only vrrp` to run one part alone).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<Kind>,
    },
    /// One screen: every running part, its state and key counters.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Details of one capability of the running daemon.
    Show {
        /// gre | nat | lb | vrrp | sync | ssh
        #[arg(value_enum)]
        what: Kind,
        #[command(flatten)]
        control: ControlArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Times in UTC instead of local time (`show vrrp`'s transitions).
        #[arg(long)]
        utc: bool,
        /// `show lb`: one line per flow of the virtual services, as `ipvsadm -Lnc` (protocol,
        /// expiry mm:ss, state, client, VIP:port, backend).
        #[arg(long)]
        connections: bool,
        /// With --connections: only this service's flows.
        #[arg(long, requires = "connections", value_name = "NAME")]
        service: Option<String>,
        /// With --connections: only the flows to this backend (`ip:port`).
        #[arg(long, requires = "connections", value_name = "ADDR:PORT")]
        backend: Option<String>,
        /// With --connections: only the flows from this client address.
        #[arg(long, requires = "connections", value_name = "ADDR")]
        client: Option<std::net::Ipv4Addr>,
        /// With --connections: list at most this many flows (1..=65536; the output says so
        /// when it cuts the list).
        #[arg(long, requires = "connections", default_value_t = 1000,
              value_parser = clap::value_parser!(u32).range(1..=65_536))]
        limit: u32,
        /// `show lb`: connections, packets and bytes per second of each service and backend
        /// (`ipvsadm -Ln --rate`), from two readings of the counters --interval apart.
        #[arg(long, conflicts_with = "connections")]
        rate: bool,
        /// With --rate: the time between the two readings, e.g. `2s`; 100ms..=60s.
        #[arg(long, requires = "rate", default_value = "1s", value_parser = parse_rate_interval)]
        interval: std::time::Duration,
    },
    /// Re-read the running daemon's config and apply the changes (like SIGHUP, but reports back).
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Restart the running daemon in place (same pid; the binary at its path now): the NAT
    /// kernel path keeps forwarding established flows meanwhile and the new daemon adopts
    /// them. A plain stop (SIGTERM) removes the kernel path instead.
    Restart {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Operate the PAT gateway of the running daemon.
    Nat {
        #[command(subcommand)]
        op: NatOp,
    },
    /// Operate the virtual services of the running daemon.
    Lb {
        #[command(subcommand)]
        op: LbOp,
    },
    /// Operate the HTTP (L7) listeners of the running daemon.
    Http {
        #[command(subcommand)]
        op: HttpOp,
    },
    /// Operate the VRRP instances of the running daemon.
    Vrrp {
        #[command(subcommand)]
        op: VrrpOp,
    },
    /// Forward ports over SSH, as `ssh -N -L/-R/-D` does (OpenSSH-compatible flags).
    Ssh(Box<SshArgs>),
    /// A forwarding-only SSH server (no shells, no commands).
    Sshd(SshdArgs),
    /// Build the demo lab in network namespaces and run vipgate in it.
    Lab {
        /// Without an action: up, tour, live status, and tear down on Ctrl-C.
        #[arg(value_enum)]
        action: Option<LabAction>,
        /// Name prefix of the lab's namespaces (`P-isp`, `P-hq`, ...), so several labs can coexist.
        #[arg(long, default_value = "vg")]
        prefix: String,
    },
    /// Print shell completions to stdout.
    Completions {
        /// bash | zsh | fish | elvish | powershell
        shell: clap_complete::Shell,
    },
    /// Write man pages (vipgate.1, one per subcommand at any depth, vipgate.toml.5) into a directory.
    Man {
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum NatOp {
    /// Remove every dynamic translation (static port forwards stay), like `clear ip nat translation *`.
    Clear {
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum LbOp {
    /// Change one backend's weight at run time (0 drains: open connections stay, new ones go
    /// elsewhere), or, with --canary, give one backend a share of the new connections.
    Weight {
        /// Service name.
        service: String,
        /// Backend address, `ip:port` as in the config (`ip` for a multi-port service's
        /// backend, which has no port).
        #[arg(required_unless_present = "canary", conflicts_with = "canary")]
        backend: Option<String>,
        /// New weight, 0..=65535.
        #[arg(required_unless_present = "canary")]
        weight: Option<u32>,
        /// `BACKEND PERCENT` (`10.0.0.3:80 10%`): BACKEND gets PERCENT % of the weight, the
        /// others the rest in the ratios of their configured weights; `0%` ends the canary
        /// (the configured weights again), `100%` sends every new connection to BACKEND.
        #[arg(long, num_args = 2, value_names = ["BACKEND", "PERCENT"])]
        canary: Option<Vec<String>>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Add a backend to a running service (ipvsadm -a). Not persisted: a restart, or a
    /// reload that changes the service in the file, replaces every runtime change to it.
    AddBackend {
        /// Service name.
        service: String,
        /// Backend address, `ip:port` (direct routing: on a connected network, the VIP's port),
        /// or `ip` alone: no port, each connection keeps its own (a multi-port service's
        /// backends are written so).
        backend: String,
        /// Weight, 0..=65535 (ipvsadm -w).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Upper connection threshold (ipvsadm -x); 0: none.
        #[arg(long, default_value_t = 0)]
        max_connections: u32,
        /// Lower connection threshold (ipvsadm -y); 0: none.
        #[arg(long, default_value_t = 0)]
        min_connections: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Remove a backend from a running service (ipvsadm -d): no new flows, the established
    /// ones run until they end (`show lb` lists it as removed meanwhile). Not persisted.
    RemoveBackend {
        /// Service name.
        service: String,
        /// Backend address, `ip:port`.
        backend: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Drain a backend (`lb set state SERVICE BACKEND drain`: no new flows, established ones
    /// run on); with --wait, return only once it holds no active connection (with --all, no
    /// inactive one either), printing the counts as they fall: the rolling-update step.
    /// Exit 1 when --timeout passes first. Not persisted.
    Drain {
        /// Service name.
        service: String,
        /// Backend address, `ip:port`.
        backend: String,
        /// Wait until the backend's connections are gone.
        #[arg(long)]
        wait: bool,
        /// With --wait: also wait for its inactive connections (closing, TIME_WAIT).
        #[arg(long, requires = "wait")]
        all: bool,
        /// With --wait: give up (exit 1) after this long, e.g. `30s`, `5m`; at most 24h.
        #[arg(long, requires = "wait", default_value = "5m", value_parser = parse_wait)]
        timeout: std::time::Duration,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Set a runtime value of a backend (HAProxy's `set server`).
    Set {
        #[command(subcommand)]
        what: LbSetOp,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum LbSetOp {
    /// Set a backend's state (HAProxy's `set server state`): ready takes new flows; drain takes
    /// no new flows but its persistent clients, checks go on; maint takes no new flows at all
    /// and is not checked. Established flows run until they end in every state. Not persisted:
    /// a restart, or a reload that changes the service in the file, makes it ready again.
    State {
        /// Service name.
        service: String,
        /// Backend address, `ip:port`.
        backend: String,
        /// ready | drain | maint
        state: balance::AdminState,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum HttpOp {
    /// Drain a backend of an HTTP pool (`http set state LISTENER POOL BACKEND drain`: no new
    /// requests, those it is answering finish); with --wait, return only once it answers none,
    /// printing the count as it falls: the rolling-update step. Exit 1 when --timeout passes
    /// first. Kept across reloads that keep the backend; a restart makes it ready.
    Drain {
        /// Listener (`[[http]]` name).
        listener: String,
        /// Pool name.
        pool: String,
        /// Backend address, `ip:port`.
        backend: String,
        /// Wait until the backend answers no request.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 1) after this long, e.g. `30s`, `5m`; at most 24h.
        #[arg(long, requires = "wait", default_value = "5m", value_parser = parse_wait)]
        timeout: std::time::Duration,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Set a runtime value of an HTTP pool's backend.
    Set {
        #[command(subcommand)]
        what: HttpSetOp,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum HttpSetOp {
    /// Set a backend's state: ready takes new requests; drain and maint take none (requests
    /// it is answering finish). Kept across reloads that keep the backend; a restart makes it
    /// ready.
    State {
        /// Listener (`[[http]]` name).
        listener: String,
        /// Pool name.
        pool: String,
        /// Backend address, `ip:port`.
        backend: String,
        /// ready | drain | maint
        state: balance::AdminState,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum VrrpOp {
    /// Change one instance's priority at run time, applied at once (a higher one preempts a
    /// lower master, a lower one on a master lets a better backup take over). Not persisted:
    /// a restart, or a reload that changes the instance's priority in the file, replaces it.
    SetPriority {
        /// Instance name.
        instance: String,
        /// New priority, 1..=254 (the file's priority again clears the runtime one).
        priority: u16,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LabAction {
    /// Build the namespaces and start vipgate on the routers and directors.
    Up,
    /// Stop everything and remove every namespace.
    Down,
    /// Which hosts exist, their addresses, whether vipgate runs.
    Status,
    /// Prove each scenario (GRE, PAT, load balancing, failover) on a lab that is up.
    Tour,
}

/// The longest `lb drain --wait --timeout`.
pub(crate) const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `--timeout` of `lb drain --wait`: a duration as the config writes it, 1ms..=24h.
fn parse_wait(text: &str) -> Result<std::time::Duration, String> {
    let d = text
        .parse::<crate::config::duration::HumanDuration>()
        .map_err(|e| e.to_string())?
        .0;
    if d.is_zero() || d > MAX_WAIT {
        return Err(format!("{text:?} is outside 1ms..=24h"));
    }
    Ok(d)
}

/// `--interval` of `show lb --rate`: long enough to count something, short enough to be a
/// glance; 100ms..=60s.
fn parse_rate_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = text
        .parse::<crate::config::duration::HumanDuration>()
        .map_err(|e| e.to_string())?
        .0;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(60) {
        return Err(format!("{text:?} is outside 100ms..=60s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_intervals_are_bounded() {
        assert_eq!(parse_rate_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_rate_interval("100ms"), Ok(Duration::from_millis(100)));
        for bad in ["10ms", "61s", "0s", "soon"] {
            assert!(parse_rate_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_drain_timeout_is_a_config_duration_within_a_day() {
        assert_eq!(parse_wait("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_wait("24h"), Ok(MAX_WAIT));
        for bad in ["0s", "24h1ms", "300", "soon", "", "-1s", "NaN"] {
            assert!(parse_wait(bad).is_err(), "{bad}");
        }
    }
}
