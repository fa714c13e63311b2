//! Prometheus metrics on `[daemon] metrics`, derived from the parts' `status()` JSON so that
//! `/metrics` and `vipgate show --json` can never disagree.
//!
//! Mapping (Prometheus naming conventions):
//! - a number at `a.b` in a part's status becomes `vipgate_<kind>_a_b{name="<part>"}`; numbers
//!   under a `counters` object, or whose key names something that only grows (packets, bytes,
//!   drops, hits, connections, transitions, reconnects, ...), are counters with a `_total` suffix;
//! - booleans become 0/1 gauges; a string `state` becomes `vipgate_<kind>_state{state="..."} 1`;
//! - arrays of objects that carry an `address`, `name`, `listen` or `spec` field (backends,
//!   forwards) become labelled series; other arrays (translation tables) are skipped — their
//!   sizes are reported by the parts as plain numbers.
//!
//! Bounds: at most 32 connections at once, 5 s to send the request and 5 s to take the
//! response, a 100 ms pause after a failed accept (EMFILE), and the page is rendered at most
//! once per second however many scrapes arrive. No authentication: bind loopback (`vipgate
//! check` warns otherwise).

use crate::parts::{Kind, Running};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::RwLock;

/// Words in a key that mark a monotonically increasing count.
const COUNTER_WORDS: [&str; 14] = [
    "packets",
    "bytes",
    "drops",
    "dropped",
    "hits",
    "connections",
    "transitions",
    "reconnects",
    "errors",
    "sent",
    "received",
    "refused",
    "adverts",
    "total",
];

/// Label keys that identify an element of an array.
const ID_KEYS: [&str; 4] = ["name", "address", "listen", "spec"];

#[derive(Default)]
struct Family {
    counter: bool,
    samples: Vec<(String, f64)>,
}

/// Renders every part's summary status as Prometheus text exposition format 0.0.4.
pub(crate) fn render(running: &Running) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (kind, name, summary) in running.summaries() {
        let labels = vec![("name".to_string(), name)];
        walk(&mut families, kind, &[], &labels, &summary, false);
    }
    let mut out = String::new();
    for (name, fam) in families {
        let (kind, full) = if fam.counter {
            ("counter", format!("{name}_total"))
        } else {
            ("gauge", name)
        };
        let _ = writeln!(out, "# TYPE {full} {kind}");
        for (labels, v) in fam.samples {
            let _ = writeln!(out, "{full}{labels} {v}");
        }
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn label_text(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn walk(
    families: &mut BTreeMap<String, Family>,
    kind: Kind,
    path: &[String],
    labels: &[(String, String)],
    value: &Value,
    in_counters: bool,
) {
    let metric = || {
        let mut n = format!("vipgate_{kind}");
        for p in path {
            n.push('_');
            n.push_str(&sanitize(p));
        }
        n.trim_end_matches("_total").to_string()
    };
    match value {
        Value::Number(n) => {
            let Some(v) = n.as_f64() else { return };
            let key = path.last().map(String::as_str).unwrap_or_default();
            let counter = in_counters
                || COUNTER_WORDS
                    .iter()
                    .any(|w| key.split('_').any(|part| part == *w));
            let fam = families.entry(metric()).or_default();
            fam.counter |= counter;
            fam.samples.push((label_text(labels), v));
        }
        Value::Bool(b) => {
            families
                .entry(metric())
                .or_default()
                .samples
                .push((label_text(labels), f64::from(u8::from(*b))));
        }
        Value::String(s) if path.last().is_some_and(|k| k == "state") => {
            let mut l = labels.to_vec();
            l.push(("state".into(), s.clone()));
            families
                .entry(metric())
                .or_default()
                .samples
                .push((label_text(&l), 1.0));
        }
        Value::Object(map) => {
            for (k, v) in map {
                let mut p = path.to_vec();
                p.push(k.clone());
                walk(
                    families,
                    kind,
                    &p,
                    labels,
                    v,
                    in_counters || k == "counters",
                );
            }
        }
        Value::Array(items) => {
            for item in items.iter().take(1000) {
                let Some(obj) = item.as_object() else { return };
                let Some((id_key, id)) = ID_KEYS
                    .iter()
                    .find_map(|k| obj.get(*k).and_then(Value::as_str).map(|v| (*k, v)))
                else {
                    return;
                };
                let mut l = labels.to_vec();
                let element = path
                    .last()
                    .map_or("item".to_string(), |p| sanitize(p.trim_end_matches('s')));
                l.push((format!("{element}_{id_key}"), id.to_string()));
                let rest: serde_json::Map<String, Value> = obj
                    .iter()
                    .filter(|(k, _)| k.as_str() != id_key)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                walk(families, kind, path, &l, &Value::Object(rest), in_counters);
            }
        }
        _ => {}
    }
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
///
/// # Errors
/// The address cannot be bound.
pub(crate) async fn serve(
    addr: SocketAddr,
    running: Arc<RwLock<Running>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding metrics endpoint {addr}: {e}"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let cache = Arc::new(RenderCache::default());
    Ok(tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let running = running.clone();
            let cache = cache.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut buf = [0u8; 1024];
                let n = match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
                let response = if request.starts_with("GET /metrics ")
                    || request.starts_with("GET / ")
                {
                    let body = cache.get(&running).await;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ =
                    tokio::time::timeout(IO_TIMEOUT, stream.write_all(response.as_bytes())).await;
            });
        }
    }))
}

/// Scrapes served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request, and take the response, within this each.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A rendered page is reused this long, so a scrape flood reaches the parts (and the NAT
/// packet-loop lock) at most once per period.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// The last rendered page and when it was rendered. The lock is held while rendering, so
/// concurrent scrapes wait for one render instead of each doing their own.
#[derive(Default)]
struct RenderCache(tokio::sync::Mutex<Option<(Instant, Arc<String>)>>);

impl RenderCache {
    async fn get(&self, running: &RwLock<Running>) -> Arc<String> {
        self.get_at(running, now()).await
    }

    async fn get_at(&self, running: &RwLock<Running>, now: Instant) -> Arc<String> {
        let mut slot = self.0.lock().await;
        if let Some((at, page)) = slot.as_ref()
            && is_fresh(*at, now)
        {
            return page.clone();
        }
        let page = Arc::new(render(&*running.read().await));
        *slot = Some((now, page.clone()));
        page
    }
}

/// The endpoint's one clock read.
#[allow(clippy::disallowed_methods, reason = "the metrics server is a driver")]
fn now() -> Instant {
    Instant::now()
}

fn is_fresh(rendered_at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(rendered_at) < CACHE_FOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parts::{BoxFuture, Part};

    struct Fake(Value);
    impl Part for Fake {
        fn kind(&self) -> Kind {
            Kind::Lb
        }
        fn name(&self) -> String {
            "web".into()
        }
        fn status(&self) -> Value {
            self.0.clone()
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    #[test]
    fn status_json_becomes_prometheus_text() {
        let status = serde_json::json!({
            "state": "up",
            "healthy": true,
            "counters": { "rx_packets": 10, "bad_checksum": 2 },
            "mappings": 42,
            "backends": [
                { "address": "10.0.0.101:80", "weight": 1, "connections": 7, "state": "up" },
                { "address": "10.0.0.102:80", "weight": 2, "connections": 9, "state": "down" }
            ],
            "translations": [ { "proto": "tcp" } ]
        });
        let running = Running {
            parts: vec![Box::new(Fake(status))],
            ..Running::default()
        };
        let text = render(&running);
        assert!(
            text.contains("# TYPE vipgate_lb_counters_rx_packets_total counter"),
            "{text}"
        );
        assert!(
            text.contains("vipgate_lb_counters_bad_checksum_total{name=\"web\"} 2"),
            "{text}"
        );
        assert!(text.contains("# TYPE vipgate_lb_mappings gauge"));
        assert!(text.contains("vipgate_lb_state{name=\"web\",state=\"up\"} 1"));
        assert!(text.contains("vipgate_lb_healthy{name=\"web\"} 1"));
        assert!(text.contains("vipgate_lb_backends_connections_total{name=\"web\",backend_address=\"10.0.0.102:80\"} 9"), "{text}");
        assert!(text.contains("vipgate_lb_backends_state{name=\"web\",backend_address=\"10.0.0.101:80\",state=\"up\"} 1"), "{text}");
        assert!(!text.contains("translations"));
        // Every family has exactly one TYPE line.
        let types = text
            .lines()
            .filter(|l| l.starts_with("# TYPE vipgate_lb_backends_weight "))
            .count();
        assert_eq!(types, 1);
    }

    struct Counting(Arc<std::sync::atomic::AtomicUsize>);
    impl Part for Counting {
        fn kind(&self) -> Kind {
            Kind::Lb
        }
        fn name(&self) -> String {
            "web".into()
        }
        fn status(&self) -> Value {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            serde_json::json!({"state": "up"})
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn a_scrape_flood_renders_once_per_period() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = RwLock::new(Running {
            parts: vec![Box::new(Counting(calls.clone()))],
            ..Running::default()
        });
        let cache = RenderCache::default();
        let first = cache.get(&running).await;
        for _ in 0..100 {
            assert_eq!(cache.get(&running).await, first);
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        let t = now();
        assert!(is_fresh(t, t + Duration::from_millis(999)));
        assert!(!is_fresh(t, t + CACHE_FOR));
    }
}
