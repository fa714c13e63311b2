//! `vipgate run`: start every configured part, serve the control socket, stop cleanly.
//!
//! Two ways to end, on purpose different:
//! - a stop (SIGTERM, SIGINT: `systemctl stop`, `systemctl restart`) stops every part, which
//!   removes everything it put in the kernel (the NAT kernel path's programs, maps and pins
//!   included);
//! - a restart (`vipgate restart`) re-execs the daemon in place, as nginx's binary upgrade
//!   does: same pid (systemd keeps tracking it; `RELOADING=1` until the new run's
//!   `READY=1`), the binary now at the path it was started from, the same arguments. Nothing
//!   is stopped first: to the kernel it is a crash. The NAT kernel path's pinned links and
//!   maps keep forwarding the established flows until the new run swaps its programs in and
//!   adopts them; every other part starts over as after a crash (each already adopts or
//!   replaces what a killed daemon leaves). The config is checked first: a file that would
//!   not start refuses the restart and the daemon stays as it is.

use crate::config;
use crate::control::{ControlServer, ReloadRequest, RestartRequest};
use crate::parts::{Kind, Running, StartCtx};
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::RwLock;

/// Runs the site in the foreground until SIGTERM or SIGINT.
///
/// # Errors
/// A bad config (all its FILE:LINE:COL lines) or a part that failed to start (named).
pub(crate) async fn run(
    path: &Path,
    preloaded: Option<config::SiteConfig>,
    only: Vec<Kind>,
) -> anyhow::Result<()> {
    let site = match preloaded {
        Some(site) => site,
        None => config::load_on_host(path)?,
    };
    if site.is_empty() {
        anyhow::bail!("{}: configures nothing to run", path.display());
    }
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let ctx = StartCtx {
        only,
        ..StartCtx::default()
    };
    let running = Arc::new(RwLock::new(Running::start(&site, &ctx).await?));
    let control_group = match &site.daemon.control_group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g.get_ref())
                .with_context(|| format!("looking up control_group {:?}", g.get_ref()))?
                .ok_or_else(|| anyhow::anyhow!("no such group {:?}", g.get_ref()))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::channel::<RestartRequest>(1);
    // The socket path stays the one this run started with (see `reload`).
    let control_path = site.daemon.control.get_ref().clone();
    let serve_control = || {
        ControlServer::start(
            &control_path,
            control_group,
            running.clone(),
            reload_tx.clone(),
            restart_tx.clone(),
        )
    };
    let mut control = match serve_control().await {
        Ok(c) => Some(c),
        Err(e) => {
            running.write().await.stop().await;
            return Err(e);
        }
    };
    let metrics = match site.daemon.metrics.as_ref().map(|m| *m.get_ref()) {
        Some(addr) => match crate::metrics::serve(addr, running.clone()).await {
            Ok(task) => Some(task),
            Err(e) => {
                drop(control);
                running.write().await.stop().await;
                return Err(e);
            }
        },
        None => None,
    };
    crate::notify::sd_notify("READY=1");
    let count = running.read().await.parts.len();
    tracing::info!(config = %path.display(), parts = count, control = %site.daemon.control.get_ref().display(), "vipgate running");

    let mut site = site;
    let mut supervise = tokio::time::interval(std::time::Duration::from_secs(1));
    supervise.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            at = supervise.tick() => {
                // The write lock only when a part has something for the supervisor.
                let busy = {
                    let r = running.read().await;
                    r.parts.iter().any(|p| p.dead_task().is_some()) || r.has_pending_restarts()
                };
                if busy {
                    running.write().await.supervise(&site, &ctx, at.into_std()).await;
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                // SIGHUP has no one to answer; the outcome goes to the log.
                let _ = reload(path, &mut site, &running, &ctx).await;
            }
            Some(reply) = reload_rx.recv() => {
                let _ = reply.send(reload(path, &mut site, &running, &ctx).await);
            }
            Some(req) = restart_rx.recv() => {
                if let Err(e) = config::load_on_host(path) {
                    tracing::error!("restart refused, the daemon stays as it is:\n{e}");
                    let _ = req.reply.send(Err(format!("restart refused, the daemon stays as it is:\n{e}")));
                    continue;
                }
                // No new client reaches this run from here on: one that connects after the
                // answer talks to the next run.
                drop(control.take());
                let _ = req.reply.send(Ok(format!("restarting in place (pid {})", std::process::id())));
                // Bounded: a client that stops reading does not hold the restart.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), req.answered).await;
                let e = reexec();
                tracing::error!("restart: {e:#}; this run goes on");
                crate::notify::sd_notify("READY=1");
                match serve_control().await {
                    Ok(c) => control = Some(c),
                    Err(e) => tracing::error!("control socket after a failed restart: {e:#}"),
                }
            }
        }
    }
    crate::notify::sd_notify("STOPPING=1");
    if let Some(m) = metrics {
        m.abort();
    }
    drop(control);
    running.write().await.stop().await;
    Ok(())
}

/// Replaces this process with the binary at the path it was started from, with the same
/// arguments (see the module docs); returns only when that fails.
fn reexec() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    // After an upgrade the running binary's inode is unlinked: /proc/self/exe then names it
    // "PATH (deleted)", and PATH holds the new binary.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return anyhow::anyhow!("finding the daemon's binary: {e}"),
    };
    let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
        Some(path) => std::path::PathBuf::from(path),
        None => exe,
    };
    tracing::info!(binary = %exe.display(), "restarting in place; the kernel path keeps forwarding");
    crate::notify::sd_notify("RELOADING=1");
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!("exec {}: {err}", exe.display())
}

/// Re-reads `path` and applies the differences; a bad file leaves everything as it was.
/// Once the file parses it becomes the running config whatever happens to each unit: the
/// parts compare with what runs, not with this, so a unit a reload could not start is started
/// by the next reload (or the supervisor) from the file as it then is. `Err` when the file is
/// refused, or when a unit refused or failed (then the message lists every unit's outcome).
async fn reload(
    path: &Path,
    site: &mut config::SiteConfig,
    running: &RwLock<Running>,
    ctx: &StartCtx,
) -> Result<Vec<String>, String> {
    let new = match config::load_on_host(path) {
        Ok(new) => new,
        Err(errors) => {
            tracing::error!("reload refused, the running config stays:\n{errors}");
            return Err(errors.to_string());
        }
    };
    if new.daemon.control != site.daemon.control {
        tracing::warn!(
            "reload: [daemon] control changed; the new socket path applies after a restart"
        );
    }
    crate::notify::sd_notify("RELOADING=1");
    let report = {
        let mut r = running.write().await;
        let report = r
            .reload(&new, ctx, tokio::time::Instant::now().into_std())
            .await;
        r.forget_deaths_outside(&new);
        report
    };
    crate::notify::sd_notify("READY=1");
    *site = new;
    if report.failed {
        tracing::error!(changes = ?report.lines, "reload of {} partly failed", path.display());
        Err(format!(
            "reload partly failed (the units not named keep running as they were):\n{}",
            report.lines.join("\n")
        ))
    } else {
        tracing::info!(changes = ?report.lines, "reloaded {}", path.display());
        Ok(report.lines)
    }
}
