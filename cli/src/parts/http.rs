//! `vipgate run` / `show http`: the L7 (HTTP/1.1) virtual services, one gateway per
//! `[[http]]`.

use super::{BoxFuture, Kind, Part, StartCtx, render_each};
use crate::config::SiteConfig;
use anyhow::Context;
use httpgw::{GatewayStatus, HttpGateway, StatusClasses};
use std::fmt::Write as _;

struct HttpPart {
    name: String,
    gateway: HttpGateway,
}

/// Starts every `[[http]]` gateway; on an error, stops the ones already started.
///
/// # Errors
/// A listener that cannot be bound.
pub(crate) async fn start(
    site: &SiteConfig,
    _ctx: &StartCtx,
) -> anyhow::Result<Vec<Box<dyn Part>>> {
    let mut parts: Vec<Box<dyn Part>> = Vec::new();
    for section in &site.http {
        let config = section.lower();
        match HttpGateway::start(&config).await {
            Ok(gateway) => {
                tracing::info!(http = %config.name, listen = %config.listen, "HTTP gateway started");
                parts.push(Box::new(HttpPart {
                    name: config.name,
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

    fn stop(self: Box<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.gateway.stop().await;
            tracing::info!(http = %self.name, "HTTP gateway stopped");
        })
    }
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

/// `show http`: per gateway its routes with hits, its pools and their backends.
pub(crate) fn render(items: &[serde_json::Value]) -> String {
    render_each(items, |out, s: &GatewayStatus| {
        let _ = writeln!(
            out,
            "http {} listen {}: {} connections, {} requests ({} refused, {} without route, {} cancelled), {}",
            s.name,
            s.listen,
            s.connections,
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
            let _ = writeln!(
                out,
                "  route {:<16} {:<32} {:>8} hits  {}",
                r.name,
                r.action,
                r.requests,
                classes(&r.responses)
            );
        }
        for p in &s.pools {
            let _ = writeln!(
                out,
                "  pool {} ({}): {} requests, {} without backend, {}",
                p.name,
                p.scheduler,
                p.requests,
                p.no_backend,
                classes(&p.responses)
            );
            if p.latency.samples > 0 {
                let _ = writeln!(out, "    response time: {}", latency(&p.latency));
            }
            for b in &p.backends {
                let _ = writeln!(
                    out,
                    "    {:<21} {:<8} weight {:<5} active {:<4} requests {:<8} failures {:<4} {}",
                    b.addr,
                    b.state,
                    b.weight,
                    b.active,
                    b.requests,
                    b.failures,
                    classes(&b.responses)
                );
            }
        }
    })
}
