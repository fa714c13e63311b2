//! The OpenSSH client options vipgate understands, from `-o Key=Value` and from ssh_config
//! files (`-F`, `~/.ssh/config`, `Include`). Pure: the caller reads files (see
//! [`IncludeLoader`]) and passes their text.
//!
//! Semantics follow ssh_config(5): keywords are case-insensitive, `Key value` and `Key=value`
//! are both accepted, arguments may be double-quoted, the first value obtained for a scalar
//! wins (so `-o` and command-line flags, applied first, override the files), while
//! `IdentityFile` and the forward keywords accumulate. `Host` blocks match the name given on
//! the command line, `Match` blocks their criteria, both with wildcards and `!`.
//!
//! Every OpenSSH client keyword is known and falls in one of three classes:
//! - applied ([`APPLIED`]): it changes what vipgate does;
//! - ignored ([`IGNORED`]): it has no bearing on port forwarding (`ForwardAgent`,
//!   `Compression`, `ControlMaster`, ...) and is logged at debug level;
//! - refused ([`REFUSED`]): vipgate cannot honour it and going on without it would weaken
//!   security or reach another host than the user meant (`ProxyCommand`, `HostKeyAlias`,
//!   `RevokedHostKeys`, ...), unless its value is the neutral default (`ProxyCommand none`).
//!
//! A keyword OpenSSH itself does not know is an error unless `IgnoreUnknown` (given before it)
//! names it, exactly as in ssh. Errors are reported even in blocks that do not match, so a typo
//! never hides until the day it matters.
//!
//! Invariants, whatever the input: a walk reads at most [`MAX_CONFIG_FILES`] files, nests
//! `Include` at most [`MAX_INCLUDE_DEPTH`] deep, refuses a file over [`MAX_CONFIG_BYTES`] and a
//! line over [`MAX_LINE_LEN`], and never recurses on anything else.

use crate::known_hosts::StrictHostKeyChecking;
use crate::pattern::{ListMatch, match_list};
use crate::spec::{DynamicSpec, ForwardSpec};

/// Deepest `Include` nesting (OpenSSH's `READCONF_MAX_DEPTH`).
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// Files read in one walk (the top file and every included one): a glob cannot fan out.
pub const MAX_CONFIG_FILES: usize = 128;
/// Largest config file accepted.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;
/// Longest config line accepted.
pub const MAX_LINE_LEN: usize = 4096;

/// Keywords that change what vipgate does (besides `Host`, `Match`, `Include`).
pub const APPLIED: &[&str] = &[
    "HostName",
    "User",
    "Port",
    "IdentityFile",
    "CertificateFile",
    "IdentitiesOnly",
    "IdentityAgent",
    "LocalForward",
    "RemoteForward",
    "DynamicForward",
    "ClearAllForwardings",
    "UserKnownHostsFile",
    "StrictHostKeyChecking",
    "ServerAliveInterval",
    "ServerAliveCountMax",
    "ExitOnForwardFailure",
    "GatewayPorts",
    "PasswordAuthentication",
    "KbdInteractiveAuthentication",
    "ChallengeResponseAuthentication",
    "BatchMode",
    "Ciphers",
    "KexAlgorithms",
    "MACs",
    "HostKeyAlgorithms",
    "ConnectTimeout",
    "ProxyJump",
    "AddressFamily",
    "BindAddress",
    "ForkAfterAuthentication",
    "IgnoreUnknown",
    "Tag",
];

/// OpenSSH client keywords that do not bear on port forwarding: accepted and ignored.
pub const IGNORED: &[&str] = &[
    "AddKeysToAgent",
    "CanonicalDomains",
    "CanonicalizeFallbackLocal",
    "CanonicalizeMaxDots",
    "CanonicalizePermittedCNAMEs",
    "CASignatureAlgorithms",
    "ChannelTimeout",
    "CheckHostIP",
    "Compression",
    "CompressionLevel",
    "ConnectionAttempts",
    "ControlMaster",
    "ControlPath",
    "ControlPersist",
    "DSAAuthentication",
    "EnableEscapeCommandline",
    "EnableSSHKeysign",
    "EscapeChar",
    "FingerprintHash",
    "ForwardAgent",
    "ForwardX11",
    "ForwardX11Timeout",
    "ForwardX11Trusted",
    "GSSAPIAuthentication",
    "GSSAPIClientIdentity",
    "GSSAPIDelegateCredentials",
    "GSSAPIKexAlgorithms",
    "GSSAPIKeyExchange",
    "GSSAPIRenewalForcesRekey",
    "GSSAPIServerIdentity",
    "GSSAPITrustDns",
    "HashKnownHosts",
    "HostbasedAcceptedAlgorithms",
    "HostbasedAuthentication",
    "HostbasedKeyTypes",
    "IPQoS",
    "KbdInteractiveDevices",
    "LocalCommand",
    "LogLevel",
    "LogVerbose",
    "NoHostAuthenticationForLocalhost",
    "NumberOfPasswordPrompts",
    "ObscureKeystrokeTiming",
    "PermitLocalCommand",
    "PKCS11Provider",
    "PreferredAuthentications",
    "Protocol",
    "ProxyUseFdpass",
    "PubkeyAcceptedAlgorithms",
    "PubkeyAcceptedKeyTypes",
    "PubkeyAuthentication",
    "RekeyLimit",
    "RemoteCommand",
    "RequestTTY",
    "RhostsRSAAuthentication",
    "RSAAuthentication",
    "SecurityKeyProvider",
    "SendEnv",
    "SessionType",
    "SetEnv",
    "SmartcardDevice",
    "StdinNull",
    "StreamLocalBindMask",
    "StreamLocalBindUnlink",
    "SyslogFacility",
    "TCPKeepAlive",
    "UpdateHostKeys",
    "UsePrivilegedPort",
    "UseRoaming",
    "VerifyHostKeyDNS",
    "VisualHostKey",
    "XAuthLocation",
];

/// OpenSSH client keywords vipgate refuses, the value that is nevertheless accepted (the
/// neutral default), and why going on without them would be wrong.
pub const REFUSED: &[(&str, &str, &str)] = &[
    (
        "ProxyCommand",
        "none",
        "vipgate does not run commands to connect, and connecting directly would take another path than the one configured (use ProxyJump)",
    ),
    (
        "HostKeyAlias",
        "",
        "host keys would be checked and recorded under another name than the one configured",
    ),
    (
        "KnownHostsCommand",
        "none",
        "host keys would be checked without the keys the command provides",
    ),
    (
        "GlobalKnownHostsFile",
        "none",
        "vipgate reads only the user known_hosts file; keys pinned in the global one would not be checked",
    ),
    (
        "RevokedHostKeys",
        "none",
        "revoked host keys would be accepted",
    ),
    (
        "RequiredRSASize",
        "1024",
        "smaller RSA keys than required would be accepted",
    ),
    (
        "CanonicalizeHostname",
        "no",
        "the host reached and the config blocks applied could differ from ssh's",
    ),
    (
        "PermitRemoteOpen",
        "any",
        "remote forwards could open connections the list forbids",
    ),
    (
        "BindInterface",
        "",
        "the connection could leave by another interface than the one configured (BindAddress is supported)",
    ),
];

/// `Match` criteria evaluated (besides `!` negation of each).
pub const MATCH_CRITERIA: &[&str] = &["all", "host", "originalhost", "user", "localuser", "tagged"];

/// Ciphers russh can negotiate.
pub const CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
];

/// `AddressFamily`, `-4`, `-6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressFamily {
    /// IPv4 or IPv6, in resolver order (`any`).
    #[default]
    Any,
    /// IPv4 only (`inet`, `-4`).
    Inet,
    /// IPv6 only (`inet6`, `-6`).
    Inet6,
}

/// An algorithm list in OpenSSH's syntax (`KexAlgorithms`, `MACs`, `HostKeyAlgorithms`):
/// a plain list replaces the defaults, `+list` appends, `-list` removes, `^list` moves to the
/// front. Patterns may use `*` and `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgorithmList(pub String);

impl AlgorithmList {
    /// Applies the list to `defaults` (what the SSH library offers, best first), keeping only
    /// names the library knows: appended names the library lacks cannot be offered, and a
    /// replacing list keeps the library's preference order among the names it selects.
    ///
    /// # Errors
    /// When nothing is left to offer.
    pub fn select<'a>(&self, defaults: &[&'a str]) -> Result<Vec<&'a str>, String> {
        let spec = self.0.trim();
        let (op, list) = match spec.chars().next() {
            Some(c @ ('+' | '-' | '^')) => (c, &spec[1..]),
            _ => ('=', spec),
        };
        let named = |name: &str| {
            list.split(',')
                .any(|p| crate::pattern::wildcard_match(p.trim(), name))
        };
        let out: Vec<&str> = match op {
            '+' => defaults.to_vec(),
            '-' => defaults.iter().copied().filter(|n| !named(n)).collect(),
            '^' => {
                let (front, back): (Vec<&str>, Vec<&str>) =
                    defaults.iter().copied().partition(|n| named(n));
                front.into_iter().chain(back).collect()
            }
            _ => defaults.iter().copied().filter(|n| named(n)).collect(),
        };
        if out.is_empty() {
            return Err(format!(
                "'{spec}' leaves no algorithm vipgate can use (it has: {})",
                defaults.join(",")
            ));
        }
        Ok(out)
    }
}

/// Options gathered from the command line, `-o` and the config files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOptions {
    /// Real host name to connect to (`HostName`), unexpanded (see [`SshOptions::target_host`]).
    pub host_name: Option<String>,
    /// Login name (`User`, `-l`, `user@`).
    pub user: Option<String>,
    /// Port (`Port`, `-p`).
    pub port: Option<u16>,
    /// Identity files in order (`IdentityFile`, `-i`), unexpanded.
    pub identity_files: Vec<String>,
    /// User certificate files (`CertificateFile`), unexpanded.
    pub certificate_files: Vec<String>,
    /// Only use the identity files, not the agent (`IdentitiesOnly`).
    pub identities_only: Option<bool>,
    /// `IdentityAgent`: `none`, `SSH_AUTH_SOCK`, or a socket path.
    pub identity_agent: Option<String>,
    /// `-L` / `LocalForward`.
    pub local_forwards: Vec<ForwardSpec>,
    /// `-R` / `RemoteForward`.
    pub remote_forwards: Vec<ForwardSpec>,
    /// `-D` / `DynamicForward`.
    pub dynamic_forwards: Vec<DynamicSpec>,
    /// `ClearAllForwardings`: drop every forward, from flags and files alike.
    pub clear_all_forwardings: Option<bool>,
    /// `UserKnownHostsFile`, unexpanded.
    pub user_known_hosts_file: Option<String>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<StrictHostKeyChecking>,
    /// `ServerAliveInterval` in seconds; 0 disables.
    pub server_alive_interval: Option<u32>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<u32>,
    /// `ExitOnForwardFailure`.
    pub exit_on_forward_failure: Option<bool>,
    /// `GatewayPorts`: local listeners with no bind address listen on all addresses.
    pub gateway_ports: Option<bool>,
    /// `BatchMode`: never prompt (passphrases, passwords).
    pub batch_mode: Option<bool>,
    /// `PasswordAuthentication`.
    pub password_authentication: Option<bool>,
    /// `KbdInteractiveAuthentication` (and its old name `ChallengeResponseAuthentication`).
    pub kbd_interactive_authentication: Option<bool>,
    /// `Ciphers`, `-c`.
    pub ciphers: Option<Vec<String>>,
    /// `KexAlgorithms`.
    pub kex_algorithms: Option<AlgorithmList>,
    /// `MACs`.
    pub macs: Option<AlgorithmList>,
    /// `HostKeyAlgorithms`.
    pub host_key_algorithms: Option<AlgorithmList>,
    /// `ConnectTimeout` in seconds.
    pub connect_timeout: Option<u32>,
    /// `AddressFamily`, `-4`, `-6`.
    pub address_family: Option<AddressFamily>,
    /// `BindAddress`: local address the SSH connection leaves from.
    pub bind_address: Option<String>,
    /// `ForkAfterAuthentication` (`-f`).
    pub fork_after_authentication: Option<bool>,
    /// `IgnoreUnknown`: patterns of keywords OpenSSH does not know that are skipped.
    pub ignore_unknown: Option<String>,
    /// `Tag`, matched by `Match tagged`.
    pub tag: Option<String>,
    /// `ProxyJump`, `-J`: the hops in order; empty for `none`.
    pub proxy_jump: Option<Vec<JumpSpec>>,
}

/// One `ProxyJump` hop: `[user@]host[:port]` or `ssh://[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpSpec {
    /// Login name on the hop, if given.
    pub user: Option<String>,
    /// The hop's name (a `Host` alias or an address).
    pub host: String,
    /// Its port, if given.
    pub port: Option<u16>,
}

/// Most `ProxyJump` hops accepted (each is a full SSH connection).
pub const MAX_JUMP_HOPS: usize = 8;

impl JumpSpec {
    /// Parses a `ProxyJump` / `-J` value: `none`, or comma-separated hops.
    ///
    /// # Errors
    /// A malformed hop, or more than [`MAX_JUMP_HOPS`].
    pub fn parse_list(value: &str) -> Result<Vec<JumpSpec>, OptionError> {
        if value.eq_ignore_ascii_case("none") {
            return Ok(Vec::new());
        }
        let hops = value
            .split(',')
            .map(|hop| JumpSpec::parse(hop).map_err(|why| bad("ProxyJump", value, &why)))
            .collect::<Result<Vec<_>, _>>()?;
        if hops.len() > MAX_JUMP_HOPS {
            return Err(bad(
                "ProxyJump",
                value,
                &format!("more than {MAX_JUMP_HOPS} hops"),
            ));
        }
        Ok(hops)
    }

    fn parse(hop: &str) -> Result<JumpSpec, String> {
        let text = hop.trim();
        let text = text.strip_prefix("ssh://").unwrap_or(text);
        let (user, rest) = match text.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(format!("hop '{hop}' has an empty user name")),
            None => (None, text),
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r
                .split_once(']')
                .ok_or_else(|| format!("hop '{hop}': unbalanced ["))?;
            match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if p.is_empty() => (h, None),
                None => return Err(format!("hop '{hop}' is not [user@]host[:port]")),
            }
        } else if rest.matches(':').count() == 1 {
            let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
            (h, Some(p))
        } else {
            (rest, None)
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0))
            .map(|p| p.ok_or_else(|| format!("hop '{hop}' has a bad port")))
            .transpose()?;
        if host.is_empty()
            || host.starts_with('-')
            || host.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/')
        {
            return Err(format!("hop '{hop}' is not [user@]host[:port]"));
        }
        Ok(JumpSpec {
            user,
            host: host.to_string(),
            port,
        })
    }
}

/// Why an option or a config file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// Not an OpenSSH client keyword (and not named by `IgnoreUnknown`).
    #[error("Bad configuration option: {0}")]
    Unknown(String),
    /// An OpenSSH keyword vipgate cannot honour safely.
    #[error("option '{keyword}' is not supported: {why}")]
    Refused {
        /// The keyword.
        keyword: String,
        /// Why going on without it would be wrong.
        why: String,
    },
    /// Keyword without a value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("bad value '{value}' for {keyword}: {why}")]
    BadValue {
        /// The keyword.
        keyword: String,
        /// The value given.
        value: String,
        /// What was expected.
        why: String,
    },
    /// A bound of the config walk was exceeded (see the module invariants).
    #[error("{0}")]
    Limit(String),
    /// An included file that could not be read.
    #[error("Include {pattern}: {why}")]
    Include {
        /// The `Include` argument.
        pattern: String,
        /// What went wrong.
        why: String,
    },
    /// An error in a config file, with its name and line number.
    #[error("{file} line {line}: {source}")]
    AtLine {
        /// The file's name as given.
        file: String,
        /// 1-based line.
        line: usize,
        /// What went wrong.
        source: Box<OptionError>,
    },
}

fn yes_no(keyword: &str, value: &str) -> Result<bool, OptionError> {
    match value.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(bad(keyword, value, "expected yes or no")),
    }
}

fn bad(keyword: &str, value: &str, why: &str) -> OptionError {
    OptionError::BadValue {
        keyword: keyword.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// Splits a line into its keyword and arguments: `Key=Value`, `Key Value`, `Key = Value`;
/// arguments are whitespace-separated, a double-quoted argument may hold spaces.
fn split_line(line: &str) -> Result<(&str, Vec<String>), OptionError> {
    let line = line.trim();
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    let mut args = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else { break };
        let mut arg = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(c) => arg.push(c),
                    None => {
                        return Err(bad(keyword, rest, "unterminated quote"));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                arg.push(c);
            }
        }
        args.push(arg);
    }
    Ok((keyword, args))
}

/// The one argument of a scalar keyword.
fn single<'a>(keyword: &str, args: &'a [String]) -> Result<&'a str, OptionError> {
    match args {
        [] => Err(OptionError::MissingValue(keyword.to_string())),
        [one] if one.is_empty() => Err(OptionError::MissingValue(keyword.to_string())),
        [one] => Ok(one),
        more => Err(bad(keyword, &more.join(" "), "garbage at end of line")),
    }
}

fn canonical(table: &[&'static str], keyword: &str) -> Option<&'static str> {
    table
        .iter()
        .copied()
        .find(|k| k.eq_ignore_ascii_case(keyword))
}

/// Where a config file is evaluated: what `Host` and `Match` compare against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchContext {
    /// The host as typed on the command line (after `user@`), before `HostName`.
    pub original_host: String,
    /// The local user name (`Match localuser`, and `Match user` while `User` is unset).
    pub local_user: String,
}

/// A config file's name (for messages) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigText {
    /// The path as read.
    pub name: String,
    /// Its contents.
    pub text: String,
}

/// Reads the files an `Include` argument names (glob expanded, sorted, relative paths taken
/// from the including directory as ssh does); no match is an empty list, not an error.
pub trait IncludeLoader {
    /// The files for one `Include` argument.
    ///
    /// # Errors
    /// A file that exists but cannot be read, or is not safe to trust.
    fn load(&mut self, pattern: &str) -> Result<Vec<ConfigText>, OptionError>;
}

/// Values the `%` tokens of ssh_config(5) expand to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `%h`: the host connected to (after `HostName`).
    pub host: String,
    /// `%n`: the host as typed.
    pub original_host: String,
    /// `%p`: the port.
    pub port: u16,
    /// `%r`: the remote user.
    pub remote_user: String,
    /// `%u`: the local user.
    pub local_user: String,
    /// `%d`: the local home directory.
    pub home: String,
}

impl Tokens {
    /// Expands `%%`, `%h`, `%n`, `%p`, `%r`, `%u` and `%d` in `value` (for `keyword`).
    ///
    /// # Errors
    /// Another `%` sequence, as ssh refuses it.
    pub fn expand(&self, keyword: &str, value: &str) -> Result<String, OptionError> {
        let mut out = String::with_capacity(value.len());
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('h') => out.push_str(&self.host),
                Some('n') => out.push_str(&self.original_host),
                Some('p') => out.push_str(&self.port.to_string()),
                Some('r') => out.push_str(&self.remote_user),
                Some('u') => out.push_str(&self.local_user),
                Some('d') => out.push_str(&self.home),
                Some(other) => {
                    return Err(bad(
                        keyword,
                        value,
                        &format!("unknown token %{other} (vipgate expands %% %h %n %p %r %u %d)"),
                    ));
                }
                None => return Err(bad(keyword, value, "a lone % at the end")),
            }
        }
        Ok(out)
    }
}

/// State of one walk over a config file and its includes.
struct Walk<'a> {
    ctx: &'a MatchContext,
    loader: &'a mut dyn IncludeLoader,
    files: usize,
}

impl SshOptions {
    /// Applies one keyword whose value is in ssh_config syntax (first value wins for scalars).
    ///
    /// # Errors
    /// [`OptionError`] for unknown or refused keywords and bad values.
    pub fn apply(&mut self, keyword: &str, value: &str) -> Result<(), OptionError> {
        let (_, args) = split_line(&format!("k {value}"))?;
        self.apply_args(keyword, &args)
    }

    /// Applies one `-o` argument (`Key=Value` or `Key Value`).
    ///
    /// # Errors
    /// As [`SshOptions::apply`].
    pub fn apply_dash_o(&mut self, arg: &str) -> Result<(), OptionError> {
        let (k, args) = split_line(arg)?;
        if k.is_empty() {
            return Err(OptionError::MissingValue(arg.trim().to_string()));
        }
        for block in ["Host", "Match", "Include"] {
            if k.eq_ignore_ascii_case(block) {
                return Err(bad(block, &args.join(" "), "only allowed in a config file"));
            }
        }
        self.apply_args(k, &args)
    }

    /// The host to connect to: `HostName` with `%h` (and `%%`) expanded, else `original`.
    #[must_use]
    pub fn target_host(&self, original: &str) -> String {
        match &self.host_name {
            Some(name) => {
                let mut out = String::new();
                let mut chars = name.chars();
                while let Some(c) = chars.next() {
                    match (c, chars.clone().next()) {
                        ('%', Some('h')) => {
                            chars.next();
                            out.push_str(original);
                        }
                        ('%', Some('%')) => {
                            chars.next();
                            out.push('%');
                        }
                        _ => out.push(c),
                    }
                }
                out
            }
            None => original.to_string(),
        }
    }

    fn apply_args(&mut self, keyword: &str, args: &[String]) -> Result<(), OptionError> {
        if let Some(k) = canonical(APPLIED, keyword) {
            return self.apply_known(k, args);
        }
        if let Some(k) = canonical(IGNORED, keyword) {
            tracing::debug!("ignoring {k}: it does not bear on port forwarding");
            return Ok(());
        }
        if let Some((k, neutral, why)) = REFUSED
            .iter()
            .find(|(k, _, _)| k.eq_ignore_ascii_case(keyword))
        {
            let value = args.join(" ");
            if !neutral.is_empty() && value.eq_ignore_ascii_case(neutral) {
                return Ok(());
            }
            return Err(OptionError::Refused {
                keyword: (*k).to_string(),
                why: (*why).to_string(),
            });
        }
        let ignored = self
            .ignore_unknown
            .as_deref()
            .is_some_and(|list| match_list(list.split(','), keyword) == ListMatch::Match);
        if ignored {
            tracing::debug!("ignoring unknown option {keyword} (IgnoreUnknown)");
            return Ok(());
        }
        Err(OptionError::Unknown(keyword.to_string()))
    }

    fn apply_known(&mut self, k: &'static str, args: &[String]) -> Result<(), OptionError> {
        match k {
            "IdentityFile" => {
                let v = single(k, args)?;
                self.identity_files.push(v.to_string());
            }
            "CertificateFile" => {
                let v = single(k, args)?;
                self.certificate_files.push(v.to_string());
            }
            "LocalForward" | "RemoteForward" => {
                // ssh_config's two-argument form (`8080 host:80`) is `-L`'s with a colon.
                if args.is_empty() || args.len() > 2 {
                    return Err(bad(
                        k,
                        &args.join(" "),
                        "expected [bind:]port host:hostport",
                    ));
                }
                let text = args.join(":");
                let spec = if k == "LocalForward" {
                    ForwardSpec::parse_local(&text)
                } else {
                    ForwardSpec::parse_remote(&text)
                }
                .map_err(|e| bad(k, &args.join(" "), &e.to_string()))?;
                if k == "LocalForward" {
                    self.local_forwards.push(spec);
                } else {
                    self.remote_forwards.push(spec);
                }
            }
            "DynamicForward" => {
                let v = single(k, args)?;
                let spec = DynamicSpec::parse(v).map_err(|e| bad(k, v, &e.to_string()))?;
                self.dynamic_forwards.push(spec);
            }
            "UserKnownHostsFile" => {
                // OpenSSH allows several files; the first is the one read and written here.
                let first = args
                    .first()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| OptionError::MissingValue(k.to_string()))?;
                set(&mut self.user_known_hosts_file, first.clone());
            }
            "IgnoreUnknown" => {
                let v = single(k, args)?;
                set(&mut self.ignore_unknown, v.to_string());
            }
            _ => self.apply_scalar(k, single(k, args)?)?,
        }
        Ok(())
    }

    fn apply_scalar(&mut self, k: &'static str, value: &str) -> Result<(), OptionError> {
        let seconds = |why: &str| value.parse::<u32>().map_err(|_| bad(k, value, why));
        let algorithms = |value: &str| {
            if value.trim_start_matches(['+', '-', '^']).is_empty() {
                return Err(bad(k, value, "expected a comma-separated list"));
            }
            Ok(AlgorithmList(value.to_string()))
        };
        match k {
            "HostName" => set(&mut self.host_name, value.to_string()),
            "User" => set(&mut self.user, value.to_string()),
            "Port" => {
                let p = value
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(k, value, "expected a port 1-65535"))?;
                set(&mut self.port, p);
            }
            "IdentitiesOnly" => set(&mut self.identities_only, yes_no(k, value)?),
            "IdentityAgent" => set(&mut self.identity_agent, value.to_string()),
            "ClearAllForwardings" => set(&mut self.clear_all_forwardings, yes_no(k, value)?),
            "StrictHostKeyChecking" => {
                let v = value
                    .parse::<StrictHostKeyChecking>()
                    .map_err(|why| bad(k, value, &why))?;
                set(&mut self.strict_host_key_checking, v);
            }
            "ServerAliveInterval" => set(
                &mut self.server_alive_interval,
                seconds("expected seconds")?,
            ),
            "ServerAliveCountMax" => set(
                &mut self.server_alive_count_max,
                seconds("expected a count")?,
            ),
            "ConnectTimeout" => {
                let v = seconds("expected seconds")?;
                if v == 0 {
                    return Err(bad(k, value, "expected at least 1 second"));
                }
                set(&mut self.connect_timeout, v);
            }
            "ExitOnForwardFailure" => set(&mut self.exit_on_forward_failure, yes_no(k, value)?),
            "GatewayPorts" => set(&mut self.gateway_ports, yes_no(k, value)?),
            "BatchMode" => set(&mut self.batch_mode, yes_no(k, value)?),
            "PasswordAuthentication" => {
                set(&mut self.password_authentication, yes_no(k, value)?);
            }
            "KbdInteractiveAuthentication" | "ChallengeResponseAuthentication" => {
                set(&mut self.kbd_interactive_authentication, yes_no(k, value)?);
            }
            "ForkAfterAuthentication" => {
                set(&mut self.fork_after_authentication, yes_no(k, value)?);
            }
            "Ciphers" => {
                let list: Vec<String> = value.split(',').map(|c| c.trim().to_string()).collect();
                if let Some(unknown) = list.iter().find(|c| !CIPHERS.contains(&c.as_str())) {
                    return Err(bad(
                        k,
                        value,
                        &format!(
                            "unsupported cipher '{unknown}' (supported: {})",
                            CIPHERS.join(",")
                        ),
                    ));
                }
                set(&mut self.ciphers, list);
            }
            "KexAlgorithms" => set(&mut self.kex_algorithms, algorithms(value)?),
            "MACs" => set(&mut self.macs, algorithms(value)?),
            "HostKeyAlgorithms" => set(&mut self.host_key_algorithms, algorithms(value)?),
            "AddressFamily" => {
                let family = match value.to_ascii_lowercase().as_str() {
                    "any" => AddressFamily::Any,
                    "inet" => AddressFamily::Inet,
                    "inet6" => AddressFamily::Inet6,
                    _ => return Err(bad(k, value, "expected any, inet or inet6")),
                };
                set(&mut self.address_family, family);
            }
            "BindAddress" => {
                value
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| bad(k, value, "expected an IP address"))?;
                set(&mut self.bind_address, value.to_string());
            }
            "Tag" => set(&mut self.tag, value.to_string()),
            "ProxyJump" => set(&mut self.proxy_jump, JumpSpec::parse_list(value)?),
            _ => return Err(OptionError::Unknown(k.to_string())),
        }
        Ok(())
    }

    /// Applies an ssh_config file for the destination `ctx` describes: lines before the first
    /// `Host` or `Match` apply to every host, `Include` reads more files through `loader`.
    ///
    /// # Errors
    /// The first bad line, as [`OptionError::AtLine`] (nested for included files), and the
    /// walk's bounds (module doc).
    pub fn apply_config(
        &mut self,
        file: &ConfigText,
        ctx: &MatchContext,
        loader: &mut dyn IncludeLoader,
    ) -> Result<(), OptionError> {
        let mut walk = Walk {
            ctx,
            loader,
            files: 0,
        };
        self.walk(&mut walk, file, 0, true, false)
    }

    fn walk(
        &mut self,
        walk: &mut Walk<'_>,
        file: &ConfigText,
        depth: usize,
        active_at_start: bool,
        never_match: bool,
    ) -> Result<(), OptionError> {
        walk.files += 1;
        if walk.files > MAX_CONFIG_FILES {
            return Err(OptionError::Limit(format!(
                "{}: more than {MAX_CONFIG_FILES} config files in one walk",
                file.name
            )));
        }
        if file.text.len() > MAX_CONFIG_BYTES {
            return Err(OptionError::Limit(format!(
                "{}: larger than {MAX_CONFIG_BYTES} bytes",
                file.name
            )));
        }
        let mut active = active_at_start;
        for (i, raw) in file.text.lines().enumerate() {
            let at = |e: OptionError| OptionError::AtLine {
                file: file.name.clone(),
                line: i + 1,
                source: Box::new(e),
            };
            if raw.len() > MAX_LINE_LEN {
                return Err(at(OptionError::Limit(format!(
                    "line longer than {MAX_LINE_LEN} bytes"
                ))));
            }
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, args) = split_line(line).map_err(at)?;
            if k.eq_ignore_ascii_case("Host") {
                let matched = match_list(args.iter().map(String::as_str), &walk.ctx.original_host)
                    == ListMatch::Match;
                active = matched && !never_match;
            } else if k.eq_ignore_ascii_case("Match") {
                let matched = self.match_criteria(&args, walk.ctx).map_err(at)?;
                active = matched && !never_match;
            } else if k.eq_ignore_ascii_case("Include") {
                if args.is_empty() {
                    return Err(at(OptionError::MissingValue("Include".to_string())));
                }
                if depth + 1 > MAX_INCLUDE_DEPTH {
                    return Err(at(OptionError::Limit(format!(
                        "Include nested deeper than {MAX_INCLUDE_DEPTH}"
                    ))));
                }
                for pattern in &args {
                    for included in walk.loader.load(pattern).map_err(at)? {
                        // An Include inside a block that does not match still reads (and
                        // checks) its files, but nothing in them applies, as in ssh.
                        self.walk(walk, &included, depth + 1, active, never_match || !active)
                            .map_err(at)?;
                    }
                }
            } else if active {
                self.apply_args(k, &args).map_err(at)?;
            } else {
                // Checked like an active line (a typo is reported at once), then dropped.
                let mut scratch = SshOptions {
                    ignore_unknown: self.ignore_unknown.clone(),
                    ..SshOptions::default()
                };
                scratch.apply_args(k, &args).map_err(at)?;
            }
        }
        Ok(())
    }

    /// Evaluates a `Match` line's criteria (all must hold).
    fn match_criteria(&self, args: &[String], ctx: &MatchContext) -> Result<bool, OptionError> {
        if args.is_empty() {
            return Err(OptionError::MissingValue("Match".to_string()));
        }
        let mut all = true;
        let mut i = 0;
        while i < args.len() {
            let (negated, criterion) = match args[i].strip_prefix('!') {
                Some(c) => (true, c),
                None => (false, args[i].as_str()),
            };
            let criterion = criterion.to_ascii_lowercase();
            i += 1;
            if criterion == "all" {
                if args.len() != 1 {
                    return Err(bad("Match", &args.join(" "), "'all' must stand alone"));
                }
                return Ok(!negated);
            }
            if !MATCH_CRITERIA.contains(&criterion.as_str()) {
                return Err(OptionError::Refused {
                    keyword: format!("Match {criterion}"),
                    why: format!(
                        "vipgate evaluates only Match {} (it never runs commands from a config)",
                        MATCH_CRITERIA.join(", ")
                    ),
                });
            }
            let Some(list) = args.get(i) else {
                return Err(bad("Match", &criterion, "criterion without an argument"));
            };
            i += 1;
            let subject = match criterion.as_str() {
                "host" => self.target_host(&ctx.original_host),
                "originalhost" => ctx.original_host.clone(),
                "user" => self.user.clone().unwrap_or_else(|| ctx.local_user.clone()),
                "localuser" => ctx.local_user.clone(),
                _ => self.tag.clone().unwrap_or_default(),
            };
            let hit = match_list(list.split(','), &subject) == ListMatch::Match;
            all &= hit != negated;
        }
        Ok(all)
    }
}

fn set<T>(slot: &mut Option<T>, v: T) {
    if slot.is_none() {
        *slot = Some(v);
    }
}

/// Expands a leading `~/` with the given home directory.
#[must_use]
pub fn expand_tilde(path: &str, home: Option<&str>) -> String {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => format!("{}/{rest}", h.trim_end_matches('/')),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Files by name; an Include pattern matches names with the usual wildcards.
    struct Files(Vec<(&'static str, String)>);

    impl IncludeLoader for Files {
        fn load(&mut self, pattern: &str) -> Result<Vec<ConfigText>, OptionError> {
            let mut out: Vec<ConfigText> = self
                .0
                .iter()
                .filter(|(n, _)| crate::pattern::wildcard_match(pattern, n))
                .map(|(n, t)| ConfigText {
                    name: (*n).to_string(),
                    text: t.clone(),
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        }
    }

    fn ctx(host: &str) -> MatchContext {
        MatchContext {
            original_host: host.to_string(),
            local_user: "alice".to_string(),
        }
    }

    fn parse(text: &str, host: &str) -> Result<SshOptions, OptionError> {
        parse_with(text, host, Files(Vec::new()))
    }

    fn parse_with(text: &str, host: &str, mut files: Files) -> Result<SshOptions, OptionError> {
        let mut o = SshOptions::default();
        let top = ConfigText {
            name: "config".to_string(),
            text: text.to_string(),
        };
        o.apply_config(&top, &ctx(host), &mut files)?;
        Ok(o)
    }

    #[test]
    fn dash_o_forms_and_first_wins() {
        let mut o = SshOptions::default();
        o.apply_dash_o("ServerAliveInterval=5").unwrap();
        o.apply_dash_o("serveraliveinterval 9").unwrap();
        o.apply_dash_o("StrictHostKeyChecking = accept-new")
            .unwrap();
        o.apply_dash_o("ExitOnForwardFailure=yes").unwrap();
        o.apply_dash_o("UserKnownHostsFile=\"/tmp/k h\"").unwrap();
        o.apply_dash_o("ConnectTimeout=3").unwrap();
        o.apply_dash_o("ForwardAgent=yes").unwrap();
        assert_eq!(o.server_alive_interval, Some(5));
        assert_eq!(o.exit_on_forward_failure, Some(true));
        assert_eq!(o.user_known_hosts_file.as_deref(), Some("/tmp/k h"));
        assert_eq!(o.connect_timeout, Some(3));
        let e = o.apply_dash_o("ProxyCommand=nc %h %p").unwrap_err();
        assert!(e.to_string().contains("use ProxyJump"), "{e}");
        assert!(
            e.to_string()
                .starts_with("option 'ProxyCommand' is not supported"),
            "{e}"
        );
        o.apply_dash_o("ProxyCommand=none").unwrap();
        let e = o.apply_dash_o("NoSuchOption=1").unwrap_err();
        assert_eq!(e.to_string(), "Bad configuration option: NoSuchOption");
        assert!(o.apply_dash_o("Host=x").is_err());
        assert!(o.apply_dash_o("BatchMode=maybe").is_err());
        assert!(o.apply_dash_o("Ciphers=3des-cbc").is_err());
        assert!(o.apply_dash_o("Port=0").is_err());
        assert!(
            o.apply_dash_o("Port=22 23").is_err(),
            "garbage at end of line"
        );
        assert!(o.apply_dash_o("ConnectTimeout=0").is_err());
        assert!(o.apply_dash_o("BindAddress=host").is_err());
        assert!(o.apply_dash_o("User=\"open").is_err());
    }

    #[test]
    fn keyword_tables_are_disjoint() {
        let mut all: Vec<String> = APPLIED
            .iter()
            .chain(IGNORED)
            .map(|k| k.to_ascii_lowercase())
            .chain(REFUSED.iter().map(|(k, _, _)| k.to_ascii_lowercase()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a keyword is in two classes");
    }

    #[test]
    fn config_blocks() {
        let cfg = "\
# global
ServerAliveInterval 15

Host web*  !web9
  HostName 10.0.0.5
  User ops
  Port 2222
  IdentityFile ~/.ssh/id_web
  LocalForward 8080 localhost:80
  LocalForward 127.0.0.1:8443 [::1]:443
  RemoteForward 0 localhost:22
  DynamicForward 1080

Host *
  User nobody
  Port 22
  ForwardAgent yes
  ControlMaster auto
  ControlPath ~/.ssh/cm-%r@%h:%p
";
        let mut o = SshOptions::default();
        o.apply_dash_o("Port=2200").unwrap();
        o.apply_config(
            &ConfigText {
                name: "c".into(),
                text: cfg.into(),
            },
            &ctx("web1"),
            &mut Files(Vec::new()),
        )
        .unwrap();
        assert_eq!(o.target_host("web1"), "10.0.0.5");
        assert_eq!(o.user.as_deref(), Some("ops"));
        assert_eq!(o.port, Some(2200), "-o given first wins");
        assert_eq!(o.server_alive_interval, Some(15));
        assert_eq!(o.local_forwards.len(), 2);
        assert_eq!(o.local_forwards[0].to_string(), "8080:localhost:80");
        assert_eq!(o.remote_forwards[0].to_string(), "0:localhost:22");
        assert_eq!(o.dynamic_forwards[0].port, 1080);
        let o9 = parse(cfg, "web9").unwrap();
        assert_eq!(o9.user.as_deref(), Some("nobody"));
        assert!(o9.local_forwards.is_empty());
        let err = parse("Host x\n  Bogus yes\n", "y").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config line 2: Bad configuration option: Bogus"
        );
        let err = parse("Host x\n  ProxyCommand nc %h %p\n", "y").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config line 2: option 'ProxyCommand' is not supported"),
            "{err}"
        );
    }

    #[test]
    fn ignore_unknown_must_come_first() {
        let ok = parse(
            "IgnoreUnknown UseKeychain,AddKeys*\nHost *\n  UseKeychain yes\n",
            "h",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let late = parse("UseKeychain yes\nIgnoreUnknown UseKeychain\n", "h").unwrap_err();
        assert!(
            late.to_string()
                .contains("Bad configuration option: UseKeychain")
        );
        // IgnoreUnknown does not hide a keyword vipgate refuses.
        assert!(parse("IgnoreUnknown *\nHostKeyAlias other\n", "h").is_err());
    }

    #[test]
    fn match_criteria() {
        let cfg = "\
Match host 10.0.0.* user ops
  Port 2022
Match originalhost db !localuser root
  ServerAliveInterval 7
Match !host *.example.com
  ServerAliveCountMax 9
Match tagged fast
  ConnectTimeout 2
Match all
  User fallback
";
        let mut o = SshOptions {
            host_name: Some("10.0.0.9".into()),
            user: Some("ops".into()),
            ..SshOptions::default()
        };
        o.apply_config(
            &ConfigText {
                name: "c".into(),
                text: cfg.into(),
            },
            &ctx("db"),
            &mut Files(Vec::new()),
        )
        .unwrap();
        assert_eq!(o.port, Some(2022), "host is matched after HostName");
        assert_eq!(o.server_alive_interval, Some(7));
        assert_eq!(o.server_alive_count_max, Some(9));
        assert_eq!(o.connect_timeout, None);
        let o = parse(&format!("Tag fast\n{cfg}"), "x.example.com").unwrap();
        assert_eq!(o.port, None);
        assert_eq!(o.server_alive_count_max, None);
        assert_eq!(o.connect_timeout, Some(2));
        assert_eq!(o.user.as_deref(), Some("fallback"));
        // Match user falls back to the local user while User is unset.
        let o = parse("Match user alice\n  Port 7\n", "h").unwrap();
        assert_eq!(o.port, Some(7));
        for refused in ["exec true", "canonical", "final", "localnetwork 10.0.0.0/8"] {
            let e = parse(&format!("Match {refused}\n"), "h").unwrap_err();
            assert!(e.to_string().contains("is not supported"), "{refused}: {e}");
        }
        assert!(parse("Match host\n", "h").is_err());
        assert!(parse("Match all host x\n", "h").is_err());
        assert!(parse("Match\n", "h").is_err());
    }

    #[test]
    fn includes() {
        let files = || {
            Files(vec![
                ("conf.d/05-other", "Host nomatch\n  Port 1\n".to_string()),
                ("conf.d/10-web", "Host web\n  Port 2022\n".to_string()),
                (
                    "conf.d/20-all",
                    "User shared\nIdentityFile ~/.ssh/inc\n".to_string(),
                ),
                ("nested", "Include conf.d/*\n".to_string()),
                ("self", "Include self\n".to_string()),
            ])
        };
        // Include at top level, files in name order; a Host inside an included file scopes
        // only the rest of that file, so 20-all and the line after the Include apply again.
        let o = parse_with("Include conf.d/*\nServerAliveInterval 4\n", "web", files()).unwrap();
        assert_eq!(o.port, Some(2022));
        assert_eq!(o.user.as_deref(), Some("shared"));
        assert_eq!(o.identity_files, ["~/.ssh/inc"]);
        assert_eq!(o.server_alive_interval, Some(4));
        // Inside a non-matching block nothing included applies, even after a Host line.
        let o = parse_with("Host other\n  Include nested\n", "web", files()).unwrap();
        assert_eq!(o, SshOptions::default());
        // Inside a matching block it applies.
        let o = parse_with("Host web\n  Include nested\n", "web", files()).unwrap();
        assert_eq!(o.port, Some(2022));
        // No match is not an error.
        parse_with("Include missing/*\n", "web", files()).unwrap();
        let e = parse_with("Include self\n", "h", files()).unwrap_err();
        assert!(
            e.to_string().contains("Include nested deeper than 16"),
            "{e}"
        );
        let e = parse_with("Include self\n", "h", files()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config line 1: self line 1: self line 1"),
            "{e}"
        );
    }

    #[test]
    fn walk_bounds() {
        let long = format!("User {}\n", "x".repeat(MAX_LINE_LEN));
        let e = parse(&long, "h").unwrap_err();
        assert!(e.to_string().contains("line longer than"), "{e}");
        let big = "# padding\n".repeat(MAX_CONFIG_BYTES / 10 + 1);
        assert!(
            parse(&big, "h")
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
        // Includes that fan out instead of nesting: the file count stops them.
        let fan = Files(vec![
            ("fan", format!("Include{}\n", " leaf".repeat(20))),
            ("leaf", String::new()),
        ]);
        let e = parse_with(&format!("Include{}\n", " fan".repeat(7)), "h", fan).unwrap_err();
        assert!(e.to_string().contains("more than 128 config files"), "{e}");
    }

    #[test]
    fn tokens() {
        let t = Tokens {
            host: "10.0.0.5".into(),
            original_host: "web".into(),
            port: 2222,
            remote_user: "ops".into(),
            local_user: "alice".into(),
            home: "/home/alice".into(),
        };
        assert_eq!(
            t.expand("IdentityFile", "%d/.ssh/%r@%h:%p-%n-%u-100%%")
                .unwrap(),
            "/home/alice/.ssh/ops@10.0.0.5:2222-web-alice-100%"
        );
        assert!(t.expand("IdentityFile", "%C").is_err());
        assert!(t.expand("IdentityFile", "50%").is_err());
        let o = SshOptions {
            host_name: Some("%h.internal".into()),
            ..SshOptions::default()
        };
        assert_eq!(o.target_host("db"), "db.internal");
    }

    #[test]
    fn algorithm_lists() {
        let defaults = [
            "curve25519-sha256",
            "ecdh-sha2-nistp256",
            "diffie-hellman-group14-sha256",
        ];
        let sel = |s: &str| AlgorithmList(s.to_string()).select(&defaults);
        assert_eq!(sel("curve25519-sha256").unwrap(), ["curve25519-sha256"]);
        assert_eq!(
            sel("-ecdh-*").unwrap(),
            ["curve25519-sha256", "diffie-hellman-group14-sha256"]
        );
        assert_eq!(
            sel("^diffie-hellman-group14-sha256").unwrap(),
            [
                "diffie-hellman-group14-sha256",
                "curve25519-sha256",
                "ecdh-sha2-nistp256"
            ]
        );
        assert_eq!(sel("+sntrup761x25519-sha512@openssh.com").unwrap().len(), 3);
        assert!(sel("diffie-hellman-group1-sha1").is_err());
    }

    #[test]
    fn jump_hosts() {
        let hops = JumpSpec::parse_list("ops@bastion:2222,ssh://[::1]:22,inner").unwrap();
        assert_eq!(
            hops,
            [
                JumpSpec {
                    user: Some("ops".into()),
                    host: "bastion".into(),
                    port: Some(2222)
                },
                JumpSpec {
                    user: None,
                    host: "::1".into(),
                    port: Some(22)
                },
                JumpSpec {
                    user: None,
                    host: "inner".into(),
                    port: None
                },
            ]
        );
        assert!(JumpSpec::parse_list("none").unwrap().is_empty());
        for bad in [
            "",
            "a,,b",
            "@h",
            "h:0",
            "h:x",
            "-oProxyCommand=x",
            "[::1",
            "a b",
        ] {
            assert!(JumpSpec::parse_list(bad).is_err(), "{bad}");
        }
        assert!(JumpSpec::parse_list(&["h"; MAX_JUMP_HOPS + 1].join(",")).is_err());
        let mut o = SshOptions::default();
        o.apply_dash_o("ProxyJump=none").unwrap();
        o.apply_dash_o("ProxyJump=later").unwrap();
        assert_eq!(
            o.proxy_jump,
            Some(Vec::new()),
            "first value wins, none included"
        );
    }

    #[test]
    fn tilde() {
        assert_eq!(expand_tilde("~/.ssh/id", Some("/root")), "/root/.ssh/id");
        assert_eq!(expand_tilde("/abs", Some("/root")), "/abs");
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,120}", host in ".{0,10}") {
            let _ = parse_with(&text, &host, Files(vec![("inc", text.clone())]));
            let _ = SshOptions::default().apply_dash_o(&text);
        }
    }

    #[test]
    fn password_methods_are_applied_with_the_old_name_too() {
        let mut o = SshOptions::default();
        o.apply_dash_o("PasswordAuthentication=no").unwrap();
        o.apply_dash_o("ChallengeResponseAuthentication no")
            .unwrap();
        o.apply_dash_o("KbdInteractiveAuthentication=yes").unwrap();
        assert_eq!(o.password_authentication, Some(false));
        assert_eq!(
            o.kbd_interactive_authentication,
            Some(false),
            "the first value wins"
        );
        assert!(
            SshOptions::default()
                .apply_dash_o("PasswordAuthentication=maybe")
                .is_err()
        );
    }
}
