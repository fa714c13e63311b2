//! `[[ssh]]` / `[sshd]` in `vipgate run`, `vipgate show ssh`, `vipgate ssh`, `vipgate sshd`.
//!
//! The flags of `vipgate ssh` are OpenSSH's, so scripts and muscle memory carry over:
//! `vipgate ssh -N -f -p 2222 -i key -L 8585:127.0.0.1:80 ops@host` behaves like `ssh` with
//! the same arguments, plus what autossh adds (keepalive and reconnection restoring every
//! forward). Options come from, first value wins: flags, then `-o`, then the `-F` file.

use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::SiteConfig;
use crate::config::ssh::{SshSection, SshdSection};
use anyhow::{Context, bail};
use netutil::Reconfigured;
use serde_json::json;
use sshfwd::backoff::BackoffConfig;
use sshfwd::known_hosts::StrictHostKeyChecking as Strict;
use sshfwd::options::{AddressFamily, JumpSpec, MatchContext, SshOptions, Tokens, expand_tilde};
use sshfwd::policy::PermitList;
use sshfwd::spec::{DynamicSpec, ForwardSpec};
use sshfwd::{
    Algorithms, ClientConfig, ConfigFiles, JumpHop, ServerConfig, ServerLimits, SshClient,
    SshClientStatus, SshFwdError, SshServer,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// `vipgate ssh`: the OpenSSH-compatible forwarding client.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshArgs {
    /// `[user@]host` (or a `Host` alias of the `-F` file).
    pub(crate) destination: String,
    /// A remote command: refused, vipgate only forwards.
    #[arg(trailing_var_arg = true, hide = true)]
    pub(crate) command: Vec<String>,
    /// Do not run a remote command (forwarding only); vipgate never runs one anyway.
    #[arg(short = 'N')]
    pub(crate) no_command: bool,
    /// Go to the background once every forward is established.
    #[arg(short = 'f')]
    pub(crate) background: bool,
    /// Port to connect to on the remote host.
    #[arg(short = 'p')]
    pub(crate) port: Option<u16>,
    /// Login name on the remote host.
    #[arg(short = 'l')]
    pub(crate) login: Option<String>,
    /// Identity (private key) file; repeatable.
    #[arg(short = 'i')]
    pub(crate) identity: Vec<PathBuf>,
    /// Cipher preference, comma-separated (e.g. aes128-gcm@openssh.com).
    #[arg(short = 'c')]
    pub(crate) cipher: Option<String>,
    /// Jump hosts, `[user@]host[:port]` comma-separated (`ProxyJump`): the destination is
    /// reached through the last one; every hop's host key is checked.
    #[arg(short = 'J')]
    pub(crate) jump: Option<String>,
    /// ssh_config file read instead of ~/.ssh/config and /etc/ssh/ssh_config (`none`: no
    /// file). Host, Match, Include and every OpenSSH keyword (see the README's table).
    #[arg(short = 'F')]
    pub(crate) config_file: Option<PathBuf>,
    /// `Key=Value`: any ssh_config keyword (UserKnownHostsFile, StrictHostKeyChecking,
    /// ServerAliveInterval, ExitOnForwardFailure, ConnectTimeout, ...); given first, it wins.
    #[arg(short = 'o')]
    pub(crate) options: Vec<String>,
    /// `[bind_address:]port:host:hostport` or `[bind_address:]port:/remote/socket` —
    /// forward a local port through the server.
    #[arg(short = 'L')]
    pub(crate) local: Vec<String>,
    /// `[bind_address:]port:host:hostport` — forward a server port (0 = allocated) back here.
    #[arg(short = 'R')]
    pub(crate) remote: Vec<String>,
    /// `[bind_address:]port` — a SOCKS4a/5 proxy whose connections go out through the server.
    #[arg(short = 'D')]
    pub(crate) dynamic: Vec<String>,
    /// `host:port`: forward stdin and stdout to it through the server (implies -N and no other
    /// forward), e.g. `ProxyCommand="vipgate ssh -W %h:%p bastion"` for OpenSSH's ssh.
    #[arg(short = 'W')]
    pub(crate) stdio_forward: Option<String>,
    /// Local listeners accept connections from other hosts (`GatewayPorts=yes`).
    #[arg(short = 'g')]
    pub(crate) gateway_ports: bool,
    /// Quiet: log only errors.
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Connect over IPv4 only (`AddressFamily=inet`).
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub(crate) ipv4: bool,
    /// Connect over IPv6 only (`AddressFamily=inet6`).
    #[arg(short = '6')]
    pub(crate) ipv6: bool,
    /// Append logs to this file instead of stderr.
    #[arg(short = 'E')]
    pub(crate) log_file: Option<PathBuf>,
    /// File with the passphrase of encrypted identities (else prompted on a terminal).
    #[arg(long)]
    pub(crate) passphrase_file: Option<PathBuf>,
    /// SSH connections to keep; channels are spread over them (uses more cores). Default 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) connections: u16,
}

/// `vipgate sshd`: the forwarding-only SSH server.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshdArgs {
    /// Site config whose `[sshd]` section to serve.
    #[arg(short = 'c', long = "config")]
    pub(crate) config: PathBuf,
}

/// Environment marker of the child that `-f` starts; its stdout carries one "ready" line.
const BACKGROUND_CHILD: &str = "VIPGATE_SSH_BACKGROUND_CHILD";
const READY: &str = "vipgate-ssh-ready";

fn home() -> Option<String> {
    std::env::var("HOME").ok().filter(|h| !h.is_empty())
}

fn default_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_string())
}

fn default_known_hosts() -> PathBuf {
    PathBuf::from(expand_tilde("~/.ssh/known_hosts", home().as_deref()))
}

/// Splits `[user@]host[:port]`, with `[v6]:port` for IPv6 (a bare IPv6 address has no port).
fn parse_destination(dest: &str) -> anyhow::Result<(Option<String>, String, Option<u16>)> {
    let (user, rest) = match dest.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
        Some(_) => bail!("destination `{dest}` has an empty user name"),
        None => (None, dest),
    };
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r
            .split_once(']')
            .with_context(|| format!("destination `{dest}`: unbalanced ["))?;
        let port = match p.strip_prefix(':') {
            Some(p) => Some(
                p.parse::<u16>()
                    .with_context(|| format!("bad port in `{dest}`"))?,
            ),
            None if p.is_empty() => None,
            None => bail!("destination `{dest}` is not [user@]host[:port]"),
        };
        (h.to_string(), port)
    } else if rest.matches(':').count() == 1 {
        let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
        (
            h.to_string(),
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("bad port in `{dest}`"))?,
            ),
        )
    } else {
        (rest.to_string(), None)
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        bail!("destination `{dest}` is not [user@]host[:port]");
    }
    Ok((user, host, port))
}

/// Reads a passphrase without echo from the terminal.
fn prompt_passphrase(path: &Path) -> anyhow::Result<String> {
    use std::io::{BufRead, Write};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .context("no terminal to ask for the passphrase; use --passphrase-file")?;
    let stty = |arg: &str| {
        // An absolute path: PATH is not trusted to pick the program that touches the tty.
        std::process::Command::new("/bin/stty")
            .arg(arg)
            .stdin(
                tty.try_clone()
                    .map_or(std::process::Stdio::null(), Into::into),
            )
            .status()
    };
    let mut out = tty.try_clone()?;
    write!(out, "Enter passphrase for key '{}': ", path.display())?;
    out.flush()?;
    let _ = stty("-echo");
    let mut line = String::new();
    let read = std::io::BufReader::new(tty.try_clone()?).read_line(&mut line);
    let _ = stty("echo");
    writeln!(out)?;
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn read_passphrase_file(path: &Path) -> anyhow::Result<String> {
    sshfwd::check_file_mode(path, true)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading passphrase file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// What `vipgate ssh` was asked to do, from its flags, `-o` and the config files.
struct SshInvocation {
    cfg: ClientConfig,
    /// `-f` or `ForkAfterAuthentication`.
    background: bool,
    /// `-W host:port`.
    stdio: Option<(String, u16)>,
}

/// Applies the config files ssh would read: the `-F` file (`none` reads nothing), else
/// `~/.ssh/config` then `/etc/ssh/ssh_config`, each only if it exists.
fn apply_config_files(
    o: &mut SshOptions,
    file: Option<&Path>,
    ctx: &MatchContext,
    home: Option<&str>,
) -> anyhow::Result<()> {
    let user_files = ConfigFiles::user(home);
    let tops: Vec<(PathBuf, bool, ConfigFiles)> = match file {
        Some(f) if f == Path::new("none") => Vec::new(),
        Some(f) => {
            let text = sshfwd::read_config_file(f, false)?.with_context(|| {
                format!(
                    "Can't open user config file {}: No such file or directory",
                    f.display()
                )
            })?;
            o.apply_config(&text, ctx, &mut user_files.clone())?;
            Vec::new()
        }
        None => vec![
            (
                PathBuf::from(expand_tilde("~/.ssh/config", home)),
                true,
                user_files,
            ),
            (
                PathBuf::from("/etc/ssh/ssh_config"),
                false,
                ConfigFiles::system(home),
            ),
        ],
    };
    for (path, check_mode, mut loader) in tops {
        if let Some(text) = sshfwd::read_config_file(&path, check_mode)? {
            o.apply_config(&text, ctx, &mut loader)?;
        }
    }
    Ok(())
}

/// Builds the client config from the command line, `-o` and the config files.
fn invocation_from_args(args: &SshArgs) -> anyhow::Result<SshInvocation> {
    if !args.command.is_empty() {
        bail!(
            "vipgate ssh only forwards ports and never runs a remote command (got `{}`); use -N",
            args.command.join(" ")
        );
    }
    let (dest_user, dest_host, dest_port) = parse_destination(&args.destination)?;
    // Flags first: in OpenSSH they beat both -o given later and the config file.
    let mut o = SshOptions {
        port: args.port.or(dest_port),
        user: args.login.clone().or(dest_user),
        identity_files: args
            .identity
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        fork_after_authentication: args.background.then_some(true),
        gateway_ports: args.gateway_ports.then_some(true),
        address_family: if args.ipv4 {
            Some(AddressFamily::Inet)
        } else if args.ipv6 {
            Some(AddressFamily::Inet6)
        } else {
            None
        },
        proxy_jump: args
            .jump
            .as_deref()
            .map(JumpSpec::parse_list)
            .transpose()
            .context("-J")?,
        ..SshOptions::default()
    };
    if let Some(c) = &args.cipher {
        o.apply("Ciphers", c).context("-c")?;
    }
    for spec in &args.local {
        o.local_forwards
            .push(ForwardSpec::parse_local(spec).map_err(anyhow::Error::msg)?);
    }
    for spec in &args.remote {
        o.remote_forwards
            .push(ForwardSpec::parse_remote(spec).map_err(anyhow::Error::msg)?);
    }
    for spec in &args.dynamic {
        o.dynamic_forwards
            .push(DynamicSpec::parse(spec).map_err(anyhow::Error::msg)?);
    }
    for opt in &args.options {
        o.apply_dash_o(opt).with_context(|| format!("-o {opt}"))?;
    }
    let home = home();
    let local_user = default_user();
    let ctx = MatchContext {
        original_host: dest_host.clone(),
        local_user: local_user.clone(),
    };
    apply_config_files(&mut o, args.config_file.as_deref(), &ctx, home.as_deref())?;
    let stdio = match &args.stdio_forward {
        Some(target) => {
            let (user, host, port) = parse_destination(target)?;
            let port = port.with_context(|| format!("-W {target}: expected host:port"))?;
            if user.is_some() {
                bail!("-W {target}: expected host:port");
            }
            Some((host, port))
        }
        None => None,
    };
    // `-W` implies ClearAllForwardings, as in ssh.
    if o.clear_all_forwardings == Some(true) || stdio.is_some() {
        o.local_forwards.clear();
        o.remote_forwards.clear();
        o.dynamic_forwards.clear();
    }
    if o.local_forwards.is_empty()
        && o.remote_forwards.is_empty()
        && o.dynamic_forwards.is_empty()
        && stdio.is_none()
    {
        bail!("nothing to forward: give at least one -L, -R, -D or -W (vipgate ssh has no shell)");
    }
    let jumps = o.proxy_jump.take().unwrap_or_default();
    let host = o.target_host(&dest_host);
    let port = o.port.unwrap_or(22);
    let user = o.user.clone().unwrap_or_else(|| local_user.clone());
    let tokens = Tokens {
        host: host.clone(),
        original_host: dest_host,
        port,
        remote_user: user.clone(),
        local_user,
        home: home.clone().unwrap_or_default(),
    };
    let path = |keyword: &str, p: &str| -> anyhow::Result<PathBuf> {
        Ok(PathBuf::from(expand_tilde(
            &tokens.expand(keyword, p)?,
            home.as_deref(),
        )))
    };
    let known_hosts = match o.user_known_hosts_file.as_deref() {
        Some(p) => path("UserKnownHostsFile", p)?,
        None => default_known_hosts(),
    };
    let mut cfg = ClientConfig::new(&host, port, &user, known_hosts);
    cfg.identities = if o.identity_files.is_empty() {
        ["id_ed25519", "id_ecdsa", "id_rsa"]
            .iter()
            .map(|n| PathBuf::from(expand_tilde(&format!("~/.ssh/{n}"), home.as_deref())))
            .filter(|p| p.exists())
            .collect()
    } else {
        o.identity_files
            .iter()
            .map(|p| path("IdentityFile", p))
            .collect::<anyhow::Result<_>>()?
    };
    match o.identity_agent.as_deref() {
        Some(a) if a.eq_ignore_ascii_case("none") => cfg.use_agent = false,
        Some("SSH_AUTH_SOCK") | None => {}
        Some(a) => cfg.agent_socket = Some(path("IdentityAgent", a)?),
    }
    if o.identities_only == Some(true) {
        cfg.use_agent = false;
    }
    // OpenSSH's default is "ask", which needs a terminal dialogue; accept-new is the
    // non-interactive equivalent of answering "yes" once, and a changed key stays refused.
    cfg.strict_host_key_checking = o.strict_host_key_checking.unwrap_or(Strict::AcceptNew);
    cfg.local = o.local_forwards;
    cfg.remote = o.remote_forwards;
    cfg.dynamic = o.dynamic_forwards;
    cfg.gateway_ports = o.gateway_ports.unwrap_or(false);
    cfg.server_alive_interval = match o.server_alive_interval {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(u64::from(s))),
        None => Some(Duration::from_secs(15)),
    };
    cfg.server_alive_count_max = o.server_alive_count_max.unwrap_or(3);
    cfg.exit_on_forward_failure = o.exit_on_forward_failure.unwrap_or(true);
    cfg.ciphers = o.ciphers.unwrap_or_default();
    cfg.algorithms = Algorithms {
        kex: o.kex_algorithms,
        macs: o.macs,
        host_keys: o.host_key_algorithms,
    };
    if let Some(t) = o.connect_timeout {
        cfg.connect_timeout = Duration::from_secs(u64::from(t));
    }
    cfg.address_family = o.address_family.unwrap_or_default();
    cfg.bind_address = o
        .bind_address
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("BindAddress")?;
    cfg.jump = jumps
        .iter()
        .map(|hop| {
            resolve_hop(
                hop,
                args.config_file.as_deref(),
                home.as_deref(),
                &cfg.identities,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    cfg.connections = usize::from(args.connections);
    cfg.fail_fast = true;
    let batch = o.batch_mode.unwrap_or(false);
    cfg.passphrase = passphrase_for(&cfg.identities, args.passphrase_file.as_deref(), batch)?;
    Ok(SshInvocation {
        cfg,
        background: o.fork_after_authentication.unwrap_or(false) && stdio.is_none(),
        stdio,
    })
}

/// A `ProxyJump` hop resolved as ssh resolves it, through the same config files with the hop
/// as the host (its `HostName`, `Port`, `User`, `IdentityFile`); a hop without identity files
/// of its own uses the destination's.
fn resolve_hop(
    hop: &JumpSpec,
    file: Option<&Path>,
    home: Option<&str>,
    fallback_identities: &[PathBuf],
) -> anyhow::Result<JumpHop> {
    let local_user = default_user();
    let mut o = SshOptions {
        user: hop.user.clone(),
        port: hop.port,
        ..SshOptions::default()
    };
    let ctx = MatchContext {
        original_host: hop.host.clone(),
        local_user: local_user.clone(),
    };
    apply_config_files(&mut o, file, &ctx, home)
        .with_context(|| format!("jump host {}", hop.host))?;
    let host = o.target_host(&hop.host);
    let port = o.port.unwrap_or(22);
    let user = o.user.clone().unwrap_or_else(|| local_user.clone());
    let tokens = Tokens {
        host: host.clone(),
        original_host: hop.host.clone(),
        port,
        remote_user: user.clone(),
        local_user,
        home: home.unwrap_or_default().to_string(),
    };
    let identities = if o.identity_files.is_empty() {
        fallback_identities.to_vec()
    } else {
        o.identity_files
            .iter()
            .map(|p| {
                Ok(PathBuf::from(expand_tilde(
                    &tokens.expand("IdentityFile", p)?,
                    home,
                )))
            })
            .collect::<anyhow::Result<_>>()?
    };
    Ok(JumpHop {
        host,
        port,
        user,
        identities,
    })
}

fn passphrase_for(
    identities: &[PathBuf],
    file: Option<&Path>,
    batch: bool,
) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        return read_passphrase_file(f).map(Some);
    }
    match identities.iter().find(|p| sshfwd::identity_is_encrypted(p)) {
        Some(p) if !batch => prompt_passphrase(p).map(Some),
        Some(p) => bail!(
            "identity {} is encrypted and BatchMode forbids prompting; use --passphrase-file",
            p.display()
        ),
        None => Ok(None),
    }
}

/// Runs `vipgate ssh`. Exits as ssh does: 0 after a clean stop, 255 on any error
/// (arguments, config files, connection, authentication, a forward that cannot be set up),
/// the message on stderr in ssh's words.
pub(crate) async fn run_ssh(args: SshArgs) -> ExitCode {
    match forward_until_stopped(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(SshFwdError::HostKey(_)) = e.downcast_ref::<SshFwdError>() {
                eprintln!("{e:#}\nHost key verification failed.");
            } else {
                eprintln!("{e:#}");
            }
            ExitCode::from(255)
        }
    }
}

async fn forward_until_stopped(args: SshArgs) -> anyhow::Result<()> {
    let SshInvocation {
        cfg,
        background,
        stdio,
    } = invocation_from_args(&args)?;
    if background && std::env::var_os(BACKGROUND_CHILD).is_none() {
        return go_background().await;
    }
    let mut tunnel = SshClient::start(cfg).await?;
    if let Some((host, port)) = stdio {
        let result = stdio_forward(&tunnel, &host, port).await;
        tunnel.stop().await;
        return result;
    }
    let mut allocated = tunnel.allocated_ports();
    if let Some(rx) = allocated.as_mut() {
        while let Ok(a) = rx.try_recv() {
            allocated_message(&a, args.quiet);
        }
    }
    if std::env::var_os(BACKGROUND_CHILD).is_some() {
        println!("{READY}");
    }
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            Some(a) = async { match allocated.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                allocated_message(&a, args.quiet);
            }
        }
    }
    tunnel.stop().await;
    Ok(())
}

fn allocated_message(a: &sshfwd::AllocatedPort, quiet: bool) {
    if !quiet {
        eprintln!(
            "Allocated port {} for remote forward to {}",
            a.port, a.target
        );
    }
}

/// `-W`: stdin to the channel, the channel to stdout, until both directions are closed; a
/// closed stdin is passed on as EOF and the answer is still read to its end.
async fn stdio_forward(tunnel: &SshClient, host: &str, port: u16) -> anyhow::Result<()> {
    let mut stream = tunnel.open_stream(host, port).await?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    tokio::io::copy_bidirectional(&mut stream, &mut stdio)
        .await
        .context("stdio forwarding")?;
    Ok(())
}

/// Where `vipgate ssh` logs (`-q`, `-E`): read before logging starts.
pub(crate) fn log_settings(args: &SshArgs) -> (bool, Option<PathBuf>) {
    (args.quiet, args.log_file.clone())
}

/// `-f`: run the same command again as a detached child and return once it reports that
/// every forward is up (or fail with its error). A re-exec, not a fork: forking a process
/// that already runs tokio threads is unsound.
async fn go_background() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().context("finding the vipgate binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(BACKGROUND_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .context("starting the background process")?;
    let stdout = child
        .stdout
        .take()
        .context("no pipe to the background process")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if line == READY {
            return Ok(());
        }
        println!("{line}");
    }
    let status = child.wait().await?;
    bail!("the background process exited before its forwards were up ({status})")
}

/// Runs `vipgate sshd`.
///
/// # Errors
/// A bad config, a config without `[sshd]`, or a server that cannot start.
pub(crate) async fn run_sshd(args: SshdArgs) -> anyhow::Result<()> {
    let site = crate::config::load(&args.config)?;
    let Some(section) = &site.sshd else {
        bail!("{} has no [sshd] section", args.config.display());
    };
    let server = start_server(section).await?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    server.stop().await;
    Ok(())
}

async fn start_server(section: &SshdSection) -> anyhow::Result<SshServer> {
    let cfg = ServerConfig {
        listen: *section.listen.get_ref(),
        host_key: section.host_key.clone(),
        authorized_keys: section.authorized_keys.clone(),
        permit_open: PermitList::parse(&section.permit_open, false).map_err(anyhow::Error::msg)?,
        permit_listen: PermitList::parse(&section.permit_listen, true)
            .map_err(anyhow::Error::msg)?,
        gateway_ports: section.gateway_ports,
        idle_timeout: Some(section.idle_timeout.0),
        limits: ServerLimits {
            login_grace_time: section.login_grace_time.0,
            max_startups: section.max_startups,
            per_source_max_startups: section.per_source_max_startups,
            per_source_netblock: section.per_source_netblock_size,
            max_channels_per_session: section.max_channels_per_session,
            max_listeners_per_session: section.max_listeners_per_session,
            max_channels: section.max_channels,
            max_listeners: section.max_listeners,
        },
    };
    let server = SshServer::start(cfg).await?;
    let key = server.host_key();
    if key.generated {
        eprintln!(
            "vipgate sshd: generated host key {} ({} {})",
            section.host_key.display(),
            key.algorithm,
            key.fingerprint
        );
    }
    eprintln!(
        "vipgate sshd: listening on {}, host key {} {} (forwarding only)",
        server.local_addr(),
        key.algorithm,
        key.fingerprint
    );
    Ok(server)
}

fn client_config_from_section(d: &SshSection) -> anyhow::Result<ClientConfig> {
    let (user, host, port) = parse_destination(d.destination.get_ref())?;
    let home = home();
    let known_hosts = d.known_hosts.clone().unwrap_or_else(default_known_hosts);
    let mut cfg = ClientConfig::new(
        &host,
        port.unwrap_or(22),
        &user.unwrap_or_else(default_user),
        known_hosts,
    );
    cfg.name = d.destination.get_ref().clone();
    cfg.identities = d
        .identity
        .iter()
        .map(|p| PathBuf::from(expand_tilde(&p.display().to_string(), home.as_deref())))
        .collect();
    cfg.use_agent = d.use_agent;
    cfg.strict_host_key_checking = d.strict_host_key_checking;
    let parse = |s: &toml::Spanned<String>, f: fn(&str) -> Result<ForwardSpec, _>| {
        f(s.get_ref()).map_err(|e: sshfwd::spec::SpecError| anyhow::anyhow!(e))
    };
    cfg.local = d
        .local
        .iter()
        .map(|s| parse(s, ForwardSpec::parse_local))
        .collect::<anyhow::Result<_>>()?;
    cfg.remote = d
        .remote
        .iter()
        .map(|s| parse(s, ForwardSpec::parse_remote))
        .collect::<anyhow::Result<_>>()?;
    cfg.dynamic = d
        .dynamic
        .iter()
        .map(|s| DynamicSpec::parse(s.get_ref()).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    cfg.gateway_ports = d.gateway_ports;
    let alive = d.server_alive_interval.0;
    cfg.server_alive_interval = (!alive.is_zero()).then_some(alive);
    cfg.server_alive_count_max = d.server_alive_count_max;
    cfg.exit_on_forward_failure = d.exit_on_forward_failure;
    cfg.ciphers = d.ciphers.iter().map(|c| c.get_ref().clone()).collect();
    cfg.connections = d.connections.get();
    cfg.connect_timeout = d.connect_timeout.0;
    cfg.backoff = BackoffConfig {
        initial: d.reconnect_min.0,
        max: d.reconnect_max.0,
        ..BackoffConfig::default()
    };
    cfg.fail_fast = true;
    cfg.passphrase = match &d.passphrase_file {
        Some(f) => Some(read_passphrase_file(f)?),
        None => None,
    };
    Ok(cfg)
}

/// One `[[ssh]]` destination inside `vipgate run`.
struct SshClientPart {
    name: String,
    tunnel: SshClient,
    /// Ports allocated for `-R 0` forwards, latest per target.
    allocated: Mutex<Vec<(u16, String)>>,
    allocated_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<sshfwd::AllocatedPort>>>,
}

impl SshClientPart {
    fn drain_allocated(&self) {
        let mut rx = self
            .allocated_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut list = self
            .allocated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rx) = rx.as_mut() {
            while let Ok(a) = rx.try_recv() {
                tracing::info!(
                    "{}: allocated port {} for remote forward to {}",
                    self.name,
                    a.port,
                    a.target
                );
                list.retain(|(_, t)| *t != a.target);
                list.push((a.port, a.target));
            }
        }
    }
}

fn tunnel_json(s: &SshClientStatus) -> serde_json::Value {
    json!({
        "role": "client",
        "name": s.name,
        "state": s.state,
        "uptime_s": s.uptime.map(|u| u.as_secs()),
        "counters": { "reconnects": s.reconnects },
        "connections_up": s.connections_up,
        "last_error": s.last_error,
        "forwards": s.forwards.iter().map(|f| json!({
            "kind": f.kind,
            "spec": f.spec,
            "bound": f.bound,
            "active": f.active,
            "counters": {
                "total": f.total,
                "failed": f.failed,
                "bytes_out": f.bytes_out,
                "bytes_in": f.bytes_in,
            },
        })).collect::<Vec<_>>(),
    })
}

impl SshClientPart {
    /// `Part::reconfigure`: every check and change here is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        let Some(d) = site
            .ssh
            .iter()
            .find(|d| *d.destination.get_ref() == self.name)
        else {
            return Ok(Reconfigured::restart("the destination is gone"));
        };
        let cfg = client_config_from_section(d)?;
        self.tunnel
            .reconfigure(&cfg)
            .with_context(|| format!("ssh destination {}", self.name))
    }
}

impl Part for SshClientPart {
    fn kind(&self) -> Kind {
        Kind::Ssh
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    fn status(&self) -> serde_json::Value {
        self.drain_allocated();
        tunnel_json(&self.tunnel.status())
    }
    /// Forwards added or removed and keepalive changes go onto the live SSH connection;
    /// what identifies the connection itself (destination, identity, host keys, ciphers,
    /// `connections`, `gateway_ports`, timeouts) needs a new one.
    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(self.reconfigure_now(site))
    }
    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move { self.tunnel.stop().await })
    }
}

/// `[sshd]` inside `vipgate run`.
struct SshdPart {
    server: SshServer,
}

impl Part for SshdPart {
    fn kind(&self) -> Kind {
        Kind::Ssh
    }
    fn name(&self) -> String {
        "sshd".to_string()
    }
    fn status(&self) -> serde_json::Value {
        let s = self.server.status();
        json!({
            "role": "server",
            "name": "sshd",
            "listen": s.listen,
            "fingerprint": s.fingerprint,
            "sessions": s.sessions,
            "channels_active": s.channels_active,
            "pending": s.pending,
            "counters": {
                "logins": s.logins,
                "auth_refused": s.auth_refused,
                "forwards_refused": s.forwards_refused,
                "channels_total": s.channels_total,
                "bytes_out": s.bytes_out,
                "bytes_in": s.bytes_in,
                "refused_max_startups": s.refused_max_startups,
                "refused_per_source": s.refused_per_source,
                "login_grace_expired": s.login_grace_expired,
                "channels_refused": s.channels_refused,
                "listeners_refused": s.listeners_refused,
                "accept_errors": s.accept_errors,
            },
        })
    }
    fn dead_task(&self) -> Option<String> {
        self.server.dead_task()
    }
    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move { self.server.stop().await })
    }
}

/// Starts the `[[ssh]]` destinations and `[sshd]`.
///
/// # Errors
/// The first destination or server that cannot start (with what was started stopped again).
pub(crate) async fn start(
    site: &SiteConfig,
    _ctx: &StartCtx,
) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let mut parts: Vec<Box<dyn Part>> = Vec::new();
    let result = async {
        if let Some(section) = &site.sshd {
            parts.push(Box::new(SshdPart {
                server: start_server(section).await?,
            }));
        }
        for d in &site.ssh {
            let cfg = client_config_from_section(d)?;
            let name = cfg.name.clone();
            let mut tunnel = SshClient::start(cfg)
                .await
                .with_context(|| format!("ssh destination {name}"))?;
            let rx = tunnel.allocated_ports();
            let part = SshClientPart {
                name,
                tunnel,
                allocated: Mutex::new(Vec::new()),
                allocated_rx: Mutex::new(rx),
            };
            part.drain_allocated();
            parts.push(Box::new(part));
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match result {
        Ok(()) => Ok(parts),
        Err(e) => {
            while let Some(p) = parts.pop() {
                p.stop().await;
            }
            Err(e)
        }
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

fn uptime(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Human text for `vipgate show ssh`.
pub(crate) fn render(items: &[serde_json::Value]) -> String {
    let mut out = String::new();
    let s = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string()
    };
    let n =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    // Monotonic counts sit under `counters`.
    let c = |v: &serde_json::Value, k: &str| n(&v["counters"], k);
    for it in items {
        if s(it, "role") == "server" {
            out.push_str(&format!(
                "sshd {}  {}  sessions {}  logins {}  refused keys {} forwards {}  channels {} open / {} total  out {}  in {}\n",
                s(it, "listen"),
                s(it, "fingerprint"),
                n(it, "sessions"),
                c(it, "logins"),
                c(it, "auth_refused"),
                c(it, "forwards_refused"),
                n(it, "channels_active"),
                c(it, "channels_total"),
                bytes(c(it, "bytes_out")),
                bytes(c(it, "bytes_in")),
            ));
            out.push_str(&format!(
                "  pre-auth {}  refused: max_startups {} per_source {} grace_expired {} channel_cap {} listener_cap {}  accept errors {}\n",
                n(it, "pending"),
                c(it, "refused_max_startups"),
                c(it, "refused_per_source"),
                c(it, "login_grace_expired"),
                c(it, "channels_refused"),
                c(it, "listeners_refused"),
                c(it, "accept_errors"),
            ));
            continue;
        }
        let up = it
            .get("uptime_s")
            .and_then(serde_json::Value::as_u64)
            .map_or_else(|| "-".to_string(), uptime);
        out.push_str(&format!(
            "ssh {}  {}  up {}  reconnects {}\n",
            s(it, "name"),
            s(it, "state"),
            up,
            c(it, "reconnects")
        ));
        if let Some(e) = it.get("last_error").and_then(|e| e.as_str()) {
            out.push_str(&format!("  last error: {e}\n"));
        }
        for f in it
            .get("forwards")
            .and_then(|f| f.as_array())
            .into_iter()
            .flatten()
        {
            let bound = s(f, "bound");
            out.push_str(&format!(
                "  {:<8} {:<28} {:<22} open {}  total {}  failed {}  out {}  in {}\n",
                s(f, "kind"),
                s(f, "spec"),
                if bound.is_empty() {
                    "(not bound)".to_string()
                } else {
                    bound
                },
                n(f, "active"),
                c(f, "total"),
                c(f, "failed"),
                bytes(c(f, "bytes_out")),
                bytes(c(f, "bytes_in")),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let d = |s: &str| parse_destination(s).unwrap();
        assert_eq!(d("ops@web"), (Some("ops".into()), "web".into(), None));
        assert_eq!(
            d("ops@203.0.113.5:2222"),
            (Some("ops".into()), "203.0.113.5".into(), Some(2222))
        );
        assert_eq!(d("[::1]:22"), (None, "::1".into(), Some(22)));
        assert_eq!(d("::1"), (None, "::1".into(), None));
        assert!(parse_destination("@h").is_err());
        assert!(parse_destination("h:x").is_err());
        assert!(parse_destination("").is_err());
    }

    #[test]
    fn render_shows_forwards() {
        let v = json!({"role": "client", "name": "ops@h", "state": "connected", "uptime_s": 65,
            "counters": {"reconnects": 2}, "forwards": [{"kind": "local", "spec": "8585:127.0.0.1:80",
            "bound": "127.0.0.1:8585", "active": 1,
            "counters": {"total": 3, "failed": 0, "bytes_out": 1500, "bytes_in": 2_000_000}}]});
        let text = render(&[v]);
        assert!(
            text.contains("ssh ops@h  connected  up 1m5s  reconnects 2"),
            "{text}"
        );
        assert!(
            text.contains("127.0.0.1:8585") && text.contains("in 2.0 MB"),
            "{text}"
        );
    }
}
