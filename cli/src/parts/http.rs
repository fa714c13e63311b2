//! `vipgate run` / `show http`: the L7 (HTTP/1.1) virtual services, one gateway per
//! `[[http]]`, each its own reload unit: a changed section is applied to the running listener
//! (routes, pools, limits, checks, certificates read again) unless its listen address moves.
//! Each pool's liveness goes into the wiring as `listener/pool` for VRRP `track_services`.

use super::{BoxFuture, Kind, Part, StartCtx, ready, render_each};
use crate::config::SiteConfig;
use crate::control::ControlOp;
use anyhow::{Context, bail};
use httpgw::{GatewayStatus, HttpGateway, StatusClasses};
use netutil::Reconfigured;
use std::fmt::Write as _;
use std::net::SocketAddrV4;

struct HttpPart {
    name: String,
    listen: SocketAddrV4,
    gateway: HttpGateway,
}

impl HttpPart {
    /// `Part::reconfigure`: the swap is synchronous.
    fn reconfigure_now(&self, site: &SiteConfig) -> anyhow::Result<Reconfigured> {
        let Some(section) = site.http.iter().find(|s| *s.name.get_ref() == self.name) else {
            return Ok(Reconfigured::restart("the listener is gone"));
        };
        let config = section.lower();
        if config.listen != self.listen {
            return Ok(Reconfigured::restart("its listen address changed"));
        }
        let changed = self
            .gateway
            .reconfigure(&config)
            .with_context(|| format!("http `{}`", self.name))?;
        tracing::info!(http = %self.name, "HTTP gateway reconfigured live: {changed}");
        Ok(Reconfigured::Live)
    }
}

/// Starts every `[[http]]` gateway; on an error, stops the ones already started.
///
/// # Errors
/// A listener that cannot be bound.
pub(crate) async fn start(site: &SiteConfig, ctx: &StartCtx) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let mut parts: Vec<Box<dyn Part>> = Vec::new();
    for section in &site.http {
        let config = section.lower();
        match HttpGateway::start(&config).await {
            Ok(gateway) => {
                tracing::info!(http = %config.name, listen = %config.listen, "HTTP gateway started");
                // VRRP `track_services` names a pool `listener/pool`.
                let mut wiring = super::wiring::lock(&ctx.wiring);
                for pool in &config.pools {
                    if let Some(rx) = gateway.pool_live(&pool.name) {
                        wiring
                            .health
                            .insert(format!("{}/{}", config.name, pool.name), rx);
                    }
                }
                drop(wiring);
                parts.push(Box::new(HttpPart {
                    name: config.name,
                    listen: config.listen,
                    gateway,
                }));
            }
            Err(e) => {
                for p in parts {
                    p.stop().await;
                }
                return Err(e).with_context(|| format!("starting http `{}`", config.name));
            }
        }
    }
    Ok(parts)
}

impl Part for HttpPart {
    fn kind(&self) -> Kind {
        Kind::Http
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.gateway.status()).unwrap_or_default()
    }

    fn dead_task(&self) -> Option<String> {
        self.gateway.dead()
    }

    /// `http set state` (and `http drain`).
    fn control(&self, op: &ControlOp) -> anyhow::Result<serde_json::Value> {
        let ControlOp::HttpSetState {
            pool,
            backend,
            state,
            ..
        } = op
        else {
            bail!("http `{}` does not support `{op}`", self.name);
        };
        let changed = self
            .gateway
            .set_backend_state(pool, *backend, *state)
            .with_context(|| format!("http `{}`", self.name))?;
        tracing::info!(http = %self.name, %pool, %backend, %state, changed, "backend state set by operator");
        Ok(serde_json::json!({
            "listener": self.name,
            "pool": pool,
            "backend": backend.to_string(),
            "state": state,
            "changed": changed,
        }))
    }

    /// Everything but the listen address applies live; see [`HttpGateway::reconfigure`].
    fn reconfigure(&self, site: &SiteConfig) -> BoxFuture<anyhow::Result<Reconfigured>> {
        ready(self.reconfigure_now(site))
    }

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.gateway.stop().await;
            tracing::info!(http = %self.name, "HTTP gateway stopped");
        })
    }
}

/// The requests `backend` of `pool` of `listener` is answering, read from a `show http`
/// answer; `None` when the pool no longer lists the backend.
///
/// # Errors
/// The answer has no listener or pool of that name.
pub(crate) fn backend_active(
    show: &serde_json::Value,
    listener: &str,
    pool: &str,
    backend: SocketAddrV4,
) -> anyhow::Result<Option<u32>> {
    use serde::Deserialize as _;
    let items = show.as_array().map(Vec::as_slice).unwrap_or_default();
    let status = items
        .iter()
        .filter_map(|item| GatewayStatus::deserialize(item).ok())
        .find(|s| s.name == listener)
        .with_context(|| format!("no running http listener `{listener}`"))?;
    let pool = status
        .pools
        .iter()
        .find(|p| p.name == pool)
        .with_context(|| format!("http `{listener}` has no pool `{pool}`"))?;
    let addr = backend.to_string();
    Ok(pool
        .backends
        .iter()
        .find(|b| b.addr == addr)
        .map(|b| b.active))
}

fn classes(c: &StatusClasses) -> String {
    format!(
        "1xx {} 2xx {} 3xx {} 4xx {} 5xx {}",
        c.info, c.success, c.redirect, c.client_error, c.server_error
    )
}

/// `p50 1.2 ms  p90 3.4 ms  p99 12 ms  max 40 ms (1234 answers, last 30-60 s)`.
fn latency(l: &httpgw::latency::LatencyStatus) -> String {
    let ms = |us: u64| {
        if us < 10_000 {
            format!("{:.1} ms", us as f64 / 1000.0)
        } else {
            format!("{} ms", us / 1000)
        }
    };
    format!(
        "p50 {}  p90 {}  p99 {}  max {} ({} answers, last 30-60 s)",
        ms(l.p50_us),
        ms(l.p90_us),
        ms(l.p99_us),
        ms(l.max_us),
        l.samples
    )
}

/// A backend's health line of `show http`: why it is out, its checks, its ejections, its
/// slow start; empty for a backend with nothing to say.
fn backend_health(b: &httpgw::BackendStatus) -> String {
    let mut parts = Vec::new();
    if let Some(why) = &b.reason {
        parts.push(format!("{}: {why}", b.health));
    }
    if b.checked {
        let mut checks = format!("checks: {} failed", b.checks_failed);
        if let Some(last) = &b.last_check_failure {
            let _ = write!(checks, ", the last {last}");
        }
        parts.push(checks);
    }
    if b.ejections + b.ejections_spared > 0 || b.consecutive_errors > 0 {
        parts.push(format!(
            "ejected {} times ({} spared as the last live backend), {} errors in a row",
            b.ejections, b.ejections_spared, b.consecutive_errors
        ));
    }
    if b.slow_start {
        parts.push(format!(
            "slow start: weight {} of {}",
            b.effective_weight, b.weight
        ));
    }
    parts.join("; ")
}

/// The connections of each worker thread, ` (workers: 3 / 2)`; nothing for one worker.
fn per_worker(workers: &[u64]) -> String {
    if workers.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = workers.iter().map(u64::to_string).collect();
    format!(" (workers: {})", each.join(" / "))
}

/// `show http`: per gateway its routes with hits, its pools and their backends.
pub(crate) fn render(items: &[serde_json::Value]) -> String {
    render_each(items, |out, s: &GatewayStatus| {
        let _ = writeln!(
            out,
            "http {} listen {}: {} connections{}, {} requests ({} refused, {} without route, {} cancelled), {}",
            s.name,
            s.listen,
            s.connections,
            per_worker(&s.workers),
            s.requests,
            s.refused,
            s.no_route,
            s.cancelled,
            classes(&s.responses)
        );
        if s.latency.samples > 0 {
            let _ = writeln!(out, "  response time: {}", latency(&s.latency));
        }
        if let Some(t) = &s.tls {
            let _ = writeln!(
                out,
                "  tls: {} handshakes, {} failed, {} timed out; http/2: {} connections, {} sent away for reset floods",
                t.handshakes, t.failed, t.timed_out, t.h2, t.reset_floods
            );
        }
        for r in &s.routes {
            let canary = if r.action.contains(", canary ") {
                format!(" ({} to the canary)", r.canary_requests)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  route {:<16} {:<32} {:>8} hits{canary}  {}",
                r.name,
                r.action,
                r.requests,
                classes(&r.responses)
            );
        }
        for p in &s.pools {
            let _ = writeln!(
                out,
                "  pool {} ({}): {} requests, {} without backend, {} retries, {}",
                p.name,
                p.scheduler,
                p.requests,
                p.no_backend,
                p.retries,
                classes(&p.responses)
            );
            if p.latency.samples > 0 {
                let _ = writeln!(out, "    response time: {}", latency(&p.latency));
            }
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "    {:<21} {:<8} weight {:<5} active {:<4} requests {:<8} failures {:<4} retried {:<4} {}",
                    b.addr,
                    b.state,
                    b.weight,
                    b.active,
                    b.requests,
                    b.failures,
                    b.retried,
                    classes(&b.responses)
                );
                let health = backend_health(b);
                if !health.is_empty() {
                    let _ = writeln!(out, "      {health}");
                }
            }
        }
    })
}
