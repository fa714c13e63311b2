//! `[[ssh]]` / `[sshd]` in `vipgate run`, `vipgate show ssh`, `vipgate ssh`, `vipgate sshd`.

use super::{Part, StartCtx, not_built_yet};
use crate::config::SiteConfig;
use std::path::PathBuf;

/// `vipgate ssh`: the OpenSSH-compatible forwarding client.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshArgs {
    /// `[user@]host`.
    pub(crate) destination: String,
    /// Do not run a remote command (forwarding only); vipgate never runs one anyway.
    #[arg(short = 'N')]
    pub(crate) no_command: bool,
    /// Port to connect to on the remote host.
    #[arg(short = 'p')]
    pub(crate) port: Option<u16>,
    /// Identity (private key) file.
    #[arg(short = 'i')]
    pub(crate) identity: Vec<PathBuf>,
    /// `[bind_address:]port:host:hostport` — forward a local port to host:hostport via the server.
    #[arg(short = 'L')]
    pub(crate) local: Vec<String>,
    /// `[bind_address:]port:host:hostport` — forward a server port back to host:hostport here.
    #[arg(short = 'R')]
    pub(crate) remote: Vec<String>,
    /// `[bind_address:]port` — a SOCKS proxy whose connections go out through the server.
    #[arg(short = 'D')]
    pub(crate) dynamic: Vec<String>,
}

/// `vipgate sshd`: the forwarding-only SSH server.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SshdArgs {
    /// Site config whose `[sshd]` section to serve.
    #[arg(short = 'c', long = "config")]
    pub(crate) config: PathBuf,
}

/// Runs `vipgate ssh`.
///
/// # Errors
/// Always, until SSH forwarding lands.
pub(crate) async fn run_ssh(_args: SshArgs) -> anyhow::Result<()> {
    Err(not_built_yet("`vipgate ssh`"))
}

/// Runs `vipgate sshd`.
///
/// # Errors
/// Always, until SSH forwarding lands.
pub(crate) async fn run_sshd(_args: SshdArgs) -> anyhow::Result<()> {
    Err(not_built_yet("`vipgate sshd`"))
}

/// Starts the `[[ssh]]` destinations and `[sshd]`.
///
/// # Errors
/// Always, until SSH forwarding lands.
pub(crate) async fn start(
    _site: &SiteConfig,
    _ctx: &StartCtx,
) -> anyhow::Result<Vec<Box<dyn Part>>> {
    Err(not_built_yet("ssh"))
}

/// Human text for `vipgate show ssh`.
pub(crate) fn render(items: &[serde_json::Value]) -> String {
    items.iter().map(|i| format!("{i}\n")).collect()
}
