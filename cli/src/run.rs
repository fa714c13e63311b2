//! `vipgate run`: start every configured part, serve the control socket, stop cleanly.

use crate::config;
use crate::control::ControlServer;
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
pub(crate) async fn run(path: &Path, only: Vec<Kind>) -> anyhow::Result<()> {
    let site = config::load(path)?;
    if site.is_empty() {
        anyhow::bail!("{}: configures nothing to run", path.display());
    }
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let ctx = StartCtx { only };
    let running = Arc::new(RwLock::new(Running::start(&site, &ctx).await?));
    let control = match ControlServer::start(&site.daemon.control, running.clone()).await {
        Ok(c) => c,
        Err(e) => {
            running.write().await.stop().await;
            return Err(e);
        }
    };
    let count = running.read().await.parts.len();
    tracing::info!(config = %path.display(), parts = count, control = %site.daemon.control.display(), "vipgate running");

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => match config::load(path) {
                Err(errors) => tracing::error!("reload refused, the running config stays:\n{errors}"),
                Ok(_) => tracing::warn!(
                    "reload: {} is valid, but applying changes to a running site is not built yet; restart to apply",
                    path.display()
                ),
            },
        }
    }
    drop(control);
    running.write().await.stop().await;
    Ok(())
}
