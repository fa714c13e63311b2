//! `[[ssh]]` / `[sshd]` in `vipgate run`, `vipgate show ssh`, `vipgate ssh`, `vipgate sshd`.
//!
//! The flags of `vipgate ssh` are OpenSSH's, so scripts and muscle memory carry over:
//! `vipgate ssh -N -f -p 2222 -i key -L 8585:127.0.0.1:80 ops@host` behaves like `ssh` with
//! the same arguments, plus what autossh adds (keepalive and reconnection restoring every
//! forward). Options come from, first value wins: flags, then `-o`, then the `-F` file.

use super::{BoxFuture, Kind, Part, StartCtx, ready};
use crate::config::SiteConfig;
use crate::config::lower::{self, default_known_hosts, default_user, home};
use crate::config::ssh::{Destination, SshSection, SshdSection};
use anyhow::{Context, bail};
use netutil::Reconfigured;
use sshfwd::known_hosts::StrictHostKeyChecking as Strict;
use sshfwd::options::{AddressFamily, JumpSpec, MatchContext, SshOptions, Tokens, expand_tilde};
use sshfwd::policy::PermitList;
use sshfwd::sockpath::PathPermit;
use sshfwd::spec::{DynamicSpec, ForwardSpec};
use sshfwd::{
    Algorithms, ClientConfig, ConfigFiles, ForwardState, JumpHop, PasswordPrompt, Prompt,
    ServerConfig, ServerLimits, ServerStatus, SshClient, SshClientStatus, SshFwdError, SshServer,
};
use std::fmt::Write as _;
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
    /// `[bind_address:]port:host:hostport` — forward a server port (0 = allocated) back here;
    /// `[bind_address:]port` alone: a SOCKS proxy on the server whose connections leave from
    /// here.
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
    /// Seconds between end-to-end probes through every forward (autossh's -M); a failed probe
    /// reconnects. 0 (the default) disables.
    #[arg(long, default_value_t = 0)]
    pub(crate) probe_interval: u32,
    /// HOST:PORT the probes open a channel to for the -D forwards, which have no target of
    /// their own.
    #[arg(long, value_parser = probe_target_arg)]
    pub(crate) probe_target: Option<(String, u16)>,
}

fn probe_target_arg(s: &str) -> Result<(String, u16), String> {
    crate::config::ssh::parse_host_port(s).ok_or_else(|| format!("`{s}` is not host:port"))
}

/// `vipgate sshd`: the forwarding-only SSH server.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshdArgs {
    /// Site config whose `[sshd]` section to serve.
    #[arg(short = 'c', long = "config")]
    pub(crate) config: PathBuf,
}

/// Environment marker of the child that `-f` starts; its stdout carries one "ready" line.
/// Its value is [`ASK_PARENT`] when the parent, still in the foreground on a terminal,
/// answers the child's password and passphrase prompts (as ssh asks before it forks).
const BACKGROUND_CHILD: &str = "VIPGATE_SSH_BACKGROUND_CHILD";
const READY: &str = "vipgate-ssh-ready";
const ASK_PARENT: &str = "ask";
/// Starts a line of the child's stdout that asks the parent a question (JSON [`Ask`]); the
/// answer is one JSON line (`null` or a list of strings) on the child's stdin.
const ASK: &str = "vipgate-ssh-ask ";

/// A question the `-f` child has for the terminal, which only its parent holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Ask {
    Passphrase(PathBuf),
    Password(String),
    Keyboard {
        who: String,
        name: String,
        instructions: String,
        prompts: Vec<(String, bool)>,
    },
}

impl Ask {
    /// The parent's side: asks the terminal.
    fn on_terminal(self) -> Option<Vec<String>> {
        match self {
            Ask::Passphrase(path) => prompt_passphrase(&path).ok().map(|p| vec![p]),
            Ask::Password(who) => TerminalPrompt.password(&who).map(|p| vec![p]),
            Ask::Keyboard {
                who,
                name,
                instructions,
                prompts,
            } => TerminalPrompt.keyboard_interactive(&who, &name, &instructions, &prompts),
        }
    }

    /// The child's side: asks the parent through stdout and stdin, one question at a time.
    fn of_parent(&self) -> Option<Vec<String>> {
        use std::io::{BufRead, Read, Write};
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let question = serde_json::to_string(self).ok()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{ASK}{question}").ok()?;
        out.flush().ok()?;
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(64 * 1024)
            .read_line(&mut line)
            .ok()?;
        serde_json::from_str(&line).ok().flatten()
    }
}

/// Whether this is the `-f` child and its parent answers prompts.
fn parent_answers() -> bool {
    std::env::var_os(BACKGROUND_CHILD).is_some_and(|v| v == ASK_PARENT)
}

/// The `-f` child's prompts, answered by the parent on its terminal.
struct ParentPrompt;

impl PasswordPrompt for ParentPrompt {
    fn password(&self, who: &str) -> Option<String> {
        Ask::Password(who.to_string())
            .of_parent()?
            .into_iter()
            .next()
    }

    fn keyboard_interactive(
        &self,
        who: &str,
        name: &str,
        instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>> {
        let answers = Ask::Keyboard {
            who: who.to_string(),
            name: name.to_string(),
            instructions: instructions.to_string(),
            prompts: prompts.to_vec(),
        }
        .of_parent()?;
        (answers.len() == prompts.len()).then_some(answers)
    }
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

/// Passwords and keyboard-interactive answers typed on the controlling terminal. Ctrl-C or
/// Ctrl-D gives up (the login then fails as ssh's does), and the terminal's settings are put
/// back whatever happens.
struct TerminalPrompt;

impl PasswordPrompt for TerminalPrompt {
    fn password(&self, who: &str) -> Option<String> {
        read_tty(&format!("{}'s password: ", printable(who)), false)
            .ok()
            .flatten()
    }

    fn keyboard_interactive(
        &self,
        _who: &str,
        name: &str,
        instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>> {
        use std::io::Write;
        let mut tty = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/tty")
            .ok()?;
        for text in [name, instructions].into_iter().filter(|t| !t.is_empty()) {
            let _ = writeln!(tty, "{}", printable(text));
        }
        prompts
            .iter()
            .map(|(text, echo)| read_tty(&printable(text), *echo).ok().flatten())
            .collect()
    }
}

/// Server-supplied text made harmless on a terminal (no escape sequences), and bounded.
fn printable(text: &str) -> String {
    text.chars()
        .take(1024)
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

/// Longest answer read from the terminal.
const MAX_ANSWER: usize = 1024;

/// Shows `prompt` on /dev/tty and reads one line, echoed or not. The terminal is switched to
/// byte-at-a-time input without signals, so that Ctrl-C arrives here (and gives up) instead
/// of killing the process with echo still off; the saved settings are restored before
/// returning. `Ok(None)`: the user gave up (Ctrl-C, or Ctrl-D on an empty line).
fn read_tty(prompt: &str, echo: bool) -> std::io::Result<Option<String>> {
    use nix::sys::termios::{LocalFlags, SetArg, SpecialCharacterIndices, tcgetattr, tcsetattr};
    use std::io::{Read, Write};
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let saved = tcgetattr(&tty)?;
    let mut raw = saved.clone();
    raw.local_flags
        .remove(LocalFlags::ICANON | LocalFlags::ISIG | LocalFlags::ECHO);
    raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
    raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    tty.write_all(prompt.as_bytes())?;
    tty.flush()?;
    tcsetattr(&tty, SetArg::TCSANOW, &raw)?;
    let mut line = Vec::new();
    let answer = loop {
        let mut byte = [0u8; 1];
        match tty.read(&mut byte) {
            Ok(0) => break Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
        match byte[0] {
            b'\n' | b'\r' => break Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            0x03 => break Ok(None),
            0x04 if line.is_empty() => break Ok(None),
            // Backspace: the guard drops the last byte; only an echoed line is redrawn.
            0x7f | 0x08 if line.pop().is_some() && echo => {
                let _ = tty.write_all(b"\x08 \x08");
            }
            0x7f | 0x08 => {}
            b if line.len() < MAX_ANSWER => {
                line.push(b);
                if echo {
                    let _ = tty.write_all(&[b]);
                }
            }
            _ => {}
        }
    };
    let restored = tcsetattr(&tty, SetArg::TCSANOW, &saved);
    let _ = tty.write_all(b"\n");
    restored?;
    answer
}

/// A `password_file`'s first line, read at each login (so a changed password applies at the
/// next reconnect): the password, and the answer to every hidden keyboard-interactive prompt.
struct FilePrompt(PathBuf);

impl FilePrompt {
    fn read(&self) -> Option<String> {
        read_passphrase_file(&self.0)
            .map_err(|e| tracing::warn!("{e:#}"))
            .ok()
    }
}

impl PasswordPrompt for FilePrompt {
    fn password(&self, _who: &str) -> Option<String> {
        self.read()
    }

    fn keyboard_interactive(
        &self,
        _who: &str,
        _name: &str,
        _instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>> {
        // A visible prompt asks for something else than the password: give up.
        if prompts.iter().any(|(_, echo)| *echo) {
            return None;
        }
        let password = self.read()?;
        Some(vec![password; prompts.len()])
    }
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
    /// `BatchMode`: nothing is asked.
    batch: bool,
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
    let Destination {
        user: dest_user,
        host: dest_host,
        port: dest_port,
        ..
    } = Destination::parse(&args.destination).map_err(anyhow::Error::msg)?;
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
            let Destination {
                user, host, port, ..
            } = Destination::parse(target).map_err(anyhow::Error::msg)?;
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
    cfg.certificates = o
        .certificate_files
        .iter()
        .map(|p| path("CertificateFile", p))
        .collect::<anyhow::Result<_>>()?;
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
    cfg.probe_interval =
        (args.probe_interval > 0).then(|| Duration::from_secs(u64::from(args.probe_interval)));
    cfg.probe_target = args.probe_target.clone();
    cfg.fail_fast = true;
    let batch = o.batch_mode.unwrap_or(false);
    let background = o.fork_after_authentication.unwrap_or(false) && stdio.is_none();
    let child = std::env::var_os(BACKGROUND_CHILD).is_some();
    // The parent of a -f child asks nothing itself: the child asks it, once.
    cfg.passphrase = if background && !child {
        None
    } else {
        passphrase_for(&cfg.identities, args.passphrase_file.as_deref(), batch)?
    };
    cfg.password_authentication = o.password_authentication.unwrap_or(true);
    cfg.kbd_interactive_authentication = o.kbd_interactive_authentication.unwrap_or(true);
    // Like ssh: prompts only on a terminal, and never in BatchMode. The process `-f` starts
    // would be stopped reading the terminal from the background (SIGTTIN): its parent,
    // still in the foreground until every forward is up, asks for it.
    cfg.prompt = if batch {
        None
    } else if child {
        parent_answers().then(|| Prompt {
            source: "terminal".to_string(),
            answer: std::sync::Arc::new(ParentPrompt),
        })
    } else {
        has_tty().then(|| Prompt {
            source: "terminal".to_string(),
            answer: std::sync::Arc::new(TerminalPrompt),
        })
    };
    Ok(SshInvocation {
        cfg,
        background,
        stdio,
        batch,
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

fn has_tty() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_ok()
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
        Some(p) if !batch && parent_answers() => Ask::Passphrase(p.clone())
            .of_parent()
            .and_then(|v| v.into_iter().next())
            .map(Some)
            .with_context(|| format!("no passphrase for {}", p.display())),
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
        batch,
    } = invocation_from_args(&args)?;
    if background && std::env::var_os(BACKGROUND_CHILD).is_none() {
        return go_background(!batch && has_tty()).await;
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
/// that already runs tokio threads is unsound. With `ask` (a terminal, no BatchMode) the
/// child's passphrase, password and keyboard-interactive prompts are answered here, in the
/// foreground, before it is left on its own: what ssh does by authenticating before it
/// forks.
async fn go_background(ask: bool) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let exe = std::env::current_exe().context("finding the vipgate binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(BACKGROUND_CHILD, if ask { ASK_PARENT } else { "1" })
        .stdin(if ask {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .context("starting the background process")?;
    let stdout = child
        .stdout
        .take()
        .context("no pipe to the background process")?;
    let mut answers = child.stdin.take();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if line == READY {
            return Ok(());
        }
        if let (Some(question), Some(to_child)) = (line.strip_prefix(ASK), answers.as_mut()) {
            let answer = match serde_json::from_str::<Ask>(question) {
                Ok(ask) => tokio::task::spawn_blocking(move || ask.on_terminal())
                    .await
                    .ok()
                    .flatten(),
                Err(_) => None,
            };
            let mut reply = serde_json::to_string(&answer)?;
            reply.push('\n');
            // A child that died meanwhile shows in its exit below.
            let _ = to_child.write_all(reply.as_bytes()).await;
            continue;
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
        trusted_user_ca_keys: section.trusted_user_ca_keys.clone(),
        host_certificate: section.host_certificate.clone(),
        permit_open: PermitList::parse(&section.permit_open, false).map_err(anyhow::Error::msg)?,
        permit_listen: PermitList::parse(&section.permit_listen, true)
            .map_err(anyhow::Error::msg)?,
        permit_listen_paths: PathPermit::parse(&section.permit_listen_paths)?,
        permit_open_paths: PathPermit::parse(&section.permit_open_paths)?,
        socket_mode: section.socket_mode,
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

/// The client config of one `[[ssh]]` destination: its lowering plus the passphrase file,
/// which is read each time the destination starts or reloads.
fn client_config_from_section(d: &SshSection) -> anyhow::Result<ClientConfig> {
    let mut cfg = lower::ssh_client(d);
    cfg.passphrase = match &d.passphrase_file {
        Some(f) => Some(read_passphrase_file(f)?),
        None => None,
    };
    // A daemon has nobody to ask: passwords only from a file.
    cfg.prompt = d.password_file.as_ref().map(|f| Prompt {
        source: format!("file {}", f.display()),
        answer: std::sync::Arc::new(FilePrompt(f.clone())),
    });
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

/// One entry of `show ssh --json`: a `[[ssh]]` destination or the `[sshd]` server, told
/// apart by `role`; the text of `show ssh` is rendered from it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum SshEntry {
    /// A destination of `vipgate run`.
    Client(SshClientStatus),
    /// The forwarding-only server (its `name` is always `sshd`).
    Server {
        name: String,
        #[serde(flatten)]
        status: ServerStatus,
    },
}

fn entry_json(entry: &SshEntry) -> serde_json::Value {
    serde_json::to_value(entry).unwrap_or_default()
}

impl SshClientPart {
    /// `Part::reconfigure`: every check and change here is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        let Some(d) = site
            .ssh
            .iter()
            .find(|d| d.destination.get_ref().text == self.name)
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
        entry_json(&SshEntry::Client(self.tunnel.status()))
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
        entry_json(&SshEntry::Server {
            name: "sshd".to_string(),
            status: self.server.status(),
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
    super::render_each(items, |out, entry: &SshEntry| match entry {
        SshEntry::Server { status, .. } => render_server(out, status),
        SshEntry::Client(tunnel) => render_tunnel(out, tunnel),
    })
}

fn render_server(out: &mut String, s: &ServerStatus) {
    let c = &s.counters;
    let _ = writeln!(
        out,
        "sshd {}  {}  sessions {}  logins {}  refused keys {} forwards {}  channels {} open / {} total  out {}  in {}",
        s.listen,
        s.fingerprint,
        s.sessions,
        c.logins,
        c.auth_refused,
        c.forwards_refused,
        s.channels_active,
        c.channels_total,
        bytes(c.bytes_out),
        bytes(c.bytes_in),
    );
    let _ = writeln!(
        out,
        "  pre-auth {}  refused: max_startups {} per_source {} grace_expired {} channel_cap {} listener_cap {}  accept errors {}",
        s.pending,
        c.refused_max_startups,
        c.refused_per_source,
        c.login_grace_expired,
        c.channels_refused,
        c.listeners_refused,
        c.accept_errors,
    );
}

fn render_tunnel(out: &mut String, t: &SshClientStatus) {
    let up = t
        .uptime
        .map_or_else(|| "-".to_string(), |u| uptime(u.as_secs()));
    let _ = writeln!(
        out,
        "ssh {}  {}  up {}  reconnects {}",
        t.name,
        t.state.as_str(),
        up,
        t.counters.reconnects
    );
    if t.counters.probes > 0 {
        let _ = writeln!(
            out,
            "  probes {}  failed {}",
            t.counters.probes, t.counters.probe_failures
        );
    }
    if let Some(e) = &t.last_error {
        let _ = writeln!(out, "  last error: {e}");
    }
    for f in &t.forwards {
        let bound = match f.state {
            ForwardState::Pending => "(pending)",
            _ if f.bound.is_empty() => "(not bound)",
            _ => &f.bound,
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<28} {:<22} open {}  total {}  failed {}  out {}  in {}",
            f.kind.as_str(),
            f.spec,
            bound,
            f.active,
            f.counters.total,
            f.counters.failed,
            bytes(f.counters.bytes_out),
            bytes(f.counters.bytes_in),
        );
        if let Some(p) = &f.pending {
            let next = p
                .next_retry
                .map_or_else(|| "-".to_string(), |d| uptime(d.as_secs()));
            let _ = writeln!(
                out,
                "    pending: {}; attempts {}, next retry in {next}",
                p.reason, p.attempts
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_forwards() {
        let v = serde_json::json!({"role": "client", "name": "ops@h", "state": "connected",
            "uptime_s": 65, "connections_up": 1, "counters": {"reconnects": 2},
            "forwards": [{"kind": "local", "spec": "8585:127.0.0.1:80",
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

    #[test]
    fn render_shows_a_pending_remote_forward_and_why() {
        let v = serde_json::json!({"role": "client", "name": "ops@h", "state": "connected",
            "uptime_s": 5, "connections_up": 1, "counters": {"reconnects": 0},
            "forwards": [{"kind": "remote", "spec": "9100:127.0.0.1:80", "bound": "",
            "active": 0, "counters": {"total": 0, "failed": 0, "bytes_out": 0, "bytes_in": 0},
            "state": "pending", "pending": {"reason":
            "remote port forwarding failed for listen port 9100", "attempts": 4,
            "next_retry_s": 3}}]});
        let text = render(&[v]);
        assert!(text.contains("(pending)"), "{text}");
        assert!(
            text.contains(
                "pending: remote port forwarding failed for listen port 9100; attempts 4, next retry in 3s"
            ),
            "{text}"
        );
    }

    #[test]
    fn server_status_round_trips_with_its_role_and_name() {
        let status = ServerStatus {
            listen: "0.0.0.0:2222".into(),
            fingerprint: "SHA256:abc".into(),
            sessions: 2,
            channels_active: 1,
            pending: 3,
            counters: sshfwd::ServerCounts {
                logins: 7,
                refused_max_startups: 4,
                ..Default::default()
            },
        };
        let v = entry_json(&SshEntry::Server {
            name: "sshd".into(),
            status,
        });
        assert_eq!(v["role"], "server");
        assert_eq!(v["name"], "sshd");
        assert_eq!(v["counters"]["logins"], 7);
        let text = render(&[v]);
        assert!(
            text.contains("sshd 0.0.0.0:2222  SHA256:abc  sessions 2  logins 7"),
            "{text}"
        );
        assert!(
            text.contains("pre-auth 3  refused: max_startups 4"),
            "{text}"
        );
    }
}
