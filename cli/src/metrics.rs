//! Prometheus metrics on `[daemon] metrics`, derived from the parts' typed status (the JSON
//! that `vipgate show X --json` prints) so that `/metrics` and `show` can never disagree.
//!
//! The mapping is declared by the status types' shape, not guessed from key names:
//! - every number under a `counters` object is a counter (`…_total`); everything else is a
//!   gauge (numbers, and booleans as 0/1); the supervisor's `restarts` is a counter too;
//! - a `drops` map under `counters` (a `netutil::DropCounters`) is one counter with a
//!   `reason` label: `vipgate_gre_drops_total{tunnel="gre-br",reason="wrong_key"}`;
//! - durations are `…_ms`, `…_us` (or `…_s`) fields and become base units: `…_seconds`;
//! - a `state` string becomes `vipgate_<kind>_state{state="..."} 1`, and a `protocol` one
//!   `vipgate_<kind>_protocol{protocol="..."} 1` (a virtual service's tcp or udp);
//! - each part is labelled by its name (`tunnel`, `gateway`, `service`, `instance`,
//!   `destination`); VRRP adds its `vrid` and `interface`, GRE its `key`; the elements of
//!   the lists in [`LISTS`] (backends, HTTP pools, forwards, ACL rules, tracked objects) are labelled by
//!   their id; other lists (translations, routes, transitions) are not metrics;
//! - every family has a `# HELP` line naming the JSON field it comes from and a `# TYPE` line.
//!
//! The page is text exposition format 0.0.4 (what `promtool check metrics` lints; the
//! end-to-end test feeds it the page of a running daemon).
//!
//! Bounds: at most 32 connections at once, 5 s to send the request and 5 s to take the
//! response, a 100 ms pause after a failed accept (EMFILE), and the page is rendered at most
//! once per second however many scrapes arrive; a list yields at most 1000 labelled elements.
//! No authentication: bind loopback (`vipgate check` warns otherwise).

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

/// Lists whose elements are labelled series: (JSON key, label name, the keys the element's id
/// may be under, the first present wins; none: its 1-based position, as for ACL rules). An L4
/// backend's id is its `address`, an HTTP backend's its `addr`.
const LISTS: [(&str, &str, &[&str]); 5] = [
    ("backends", "backend", &["address", "addr"]),
    ("pools", "pool", &["name"]),
    ("forwards", "forward", &["spec"]),
    ("acl", "rule", &[]),
    ("tracked", "tracked", &["name"]),
];

/// Maps under `counters` whose keys are reasons (a `netutil::DropCounters`, VRRP's malformed
/// adverts by parse error): one counter with a `reason` label.
const REASON_MAPS: [&str; 2] = ["drops", "malformed"];

/// Elements of one list turned into series, at most.
const MAX_LIST_SERIES: usize = 1000;

/// The label naming a part of `kind`.
fn part_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Gre => "tunnel",
        Kind::Nat => "gateway",
        Kind::Lb => "service",
        Kind::Http => "http",
        Kind::Vrrp => "instance",
        Kind::Sync => "listen",
        Kind::Ssh => "destination",
    }
}

/// Top-level status fields of `kind` that identify the part: labels, not gauges.
fn identity_fields(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Vrrp => &["vrid", "interface"],
        // The GRE key is an identifier, not a quantity.
        Kind::Gre => &["key"],
        Kind::Nat | Kind::Lb | Kind::Http | Kind::Sync | Kind::Ssh => &[],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        }
    }
}

struct Family {
    kind: MetricType,
    help: String,
    samples: Vec<(String, f64)>,
}

/// Series being collected, by family name.
#[derive(Default)]
struct Families(BTreeMap<String, Family>);

impl Families {
    /// Adds a sample; a name already taken by the other type keeps its first type and the
    /// sample is left out (two status shapes never declare one name twice).
    fn add(
        &mut self,
        name: String,
        kind: MetricType,
        help: impl FnOnce() -> String,
        labels: &[(String, String)],
        value: f64,
    ) {
        let family = self.0.entry(name).or_insert_with(|| Family {
            kind,
            help: help(),
            samples: Vec::new(),
        });
        if family.kind == kind {
            family.samples.push((label_text(labels), value));
        }
    }

    fn render(self) -> String {
        let mut out = String::new();
        for (name, family) in self.0 {
            let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            for (labels, v) in family.samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

/// Renders every part's summary status as Prometheus text exposition format 0.0.4.
pub(crate) fn render(running: &Running) -> String {
    let mut families = Families::default();
    for (kind, name, summary) in running.summaries() {
        let mut labels = vec![(part_label(kind).to_string(), name)];
        let ids = identity_fields(kind);
        if let Value::Object(map) = &summary {
            for id in ids {
                match map.get(*id) {
                    Some(Value::String(v)) => labels.push(((*id).to_string(), v.clone())),
                    Some(Value::Number(v)) => labels.push(((*id).to_string(), v.to_string())),
                    _ => {}
                }
            }
        }
        let Value::Object(map) = summary else {
            continue;
        };
        let fields = map.into_iter().filter(|(k, _)| !ids.contains(&k.as_str()));
        walk_object(&mut families, kind, &[], &labels, fields, false);
    }
    families.render()
}

fn walk_object(
    families: &mut Families,
    kind: Kind,
    path: &[String],
    labels: &[(String, String)],
    fields: impl Iterator<Item = (String, Value)>,
    in_counters: bool,
) {
    for (key, value) in fields {
        walk(families, kind, path, labels, &key, value, in_counters);
    }
}

/// `vipgate_<kind>_<path>_<key>` in Prometheus spelling: `counters` adds nothing to the name
/// (counters get `_total` instead) and a list element (`backends[]`) is named by its label
/// (`backend`).
fn metric_name(kind: Kind, path: &[String], key: &str) -> String {
    let mut n = format!("vipgate_{kind}");
    for p in path.iter().map(String::as_str).chain([key]) {
        if p == "counters" {
            continue;
        }
        let p = p.strip_suffix("[]").map_or(p, |list| {
            LISTS
                .iter()
                .find(|(k, _, _)| *k == list)
                .map_or(list, |(_, label, _)| label)
        });
        n.push('_');
        n.extend(p.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        }));
    }
    n
}

fn help_text(kind: Kind, path: &[String], key: &str, what: &str) -> String {
    let mut field: Vec<&str> = path.iter().map(String::as_str).collect();
    field.push(key);
    format!(
        "{what} `{}` of `vipgate show {kind} --json`.",
        field.join(".")
    )
}

fn walk(
    families: &mut Families,
    kind: Kind,
    path: &[String],
    labels: &[(String, String)],
    key: &str,
    value: Value,
    in_counters: bool,
) {
    match value {
        Value::Number(n) => {
            let Some(mut v) = n.as_f64() else { return };
            // `restarts` is the supervisor's count, added next to the part's own fields.
            let counter = in_counters || (path.is_empty() && key == "restarts");
            let mut name = metric_name(kind, path, key);
            let mut what = "The status field";
            if let Some(stem) = name.strip_suffix("_ms") {
                name = format!("{stem}_seconds");
                v /= 1000.0;
                what = "In seconds, the status field";
            } else if let Some(stem) = name.strip_suffix("_us") {
                name = format!("{stem}_seconds");
                v /= 1_000_000.0;
                what = "In seconds, the status field";
            } else if let Some(stem) = name.strip_suffix("_s") {
                name = format!("{stem}_seconds");
            }
            let (name, kind_of, what) = if counter {
                (
                    format!("{}_total", name.trim_end_matches("_total")),
                    MetricType::Counter,
                    "The count",
                )
            } else {
                (name, MetricType::Gauge, what)
            };
            families.add(
                name,
                kind_of,
                || help_text(kind, path, key, what),
                labels,
                v,
            );
        }
        Value::Bool(b) => {
            families.add(
                metric_name(kind, path, key),
                MetricType::Gauge,
                || help_text(kind, path, key, "1 if true, the status field"),
                labels,
                f64::from(u8::from(b)),
            );
        }
        Value::String(s) if key == "state" || key == "protocol" => {
            let mut l = labels.to_vec();
            l.push((key.into(), s));
            families.add(
                metric_name(kind, path, key),
                MetricType::Gauge,
                || help_text(kind, path, key, "1 for the current value, the label of"),
                &l,
                1.0,
            );
        }
        Value::Object(map) if in_counters && REASON_MAPS.contains(&key) => {
            let name = format!("{}_total", metric_name(kind, path, key));
            for (reason, n) in map {
                let Some(n) = n.as_f64() else { continue };
                let mut l = labels.to_vec();
                l.push(("reason".into(), reason));
                families.add(
                    name.clone(),
                    MetricType::Counter,
                    || help_text(kind, path, key, "By reason, the counts in"),
                    &l,
                    n,
                );
            }
        }
        Value::Object(map) if key == "counters" => {
            let mut p = path.to_vec();
            p.push(key.to_string());
            walk_object(families, kind, &p, labels, map.into_iter(), true);
        }
        Value::Object(map) => {
            let mut p = path.to_vec();
            p.push(key.to_string());
            walk_object(families, kind, &p, labels, map.into_iter(), in_counters);
        }
        Value::Array(items) => {
            let Some((_, label, id_keys)) = LISTS.iter().find(|(k, _, _)| *k == key) else {
                return;
            };
            let mut p = path.to_vec();
            p.push(format!("{key}[]"));
            for (position, item) in items.into_iter().take(MAX_LIST_SERIES).enumerate() {
                let Value::Object(mut obj) = item else {
                    continue;
                };
                let id = if id_keys.is_empty() {
                    (position + 1).to_string()
                } else {
                    let named = id_keys.iter().find_map(|k| match obj.remove(*k) {
                        Some(Value::String(id)) => Some(id),
                        _ => None,
                    });
                    let Some(id) = named else { continue };
                    id
                };
                let mut l = labels.to_vec();
                l.push(((*label).to_string(), id));
                // An element's nested objects (an ACL rule's match fields) describe it; only
                // its `counters` are metrics.
                let fields = obj
                    .into_iter()
                    .filter(|(k, v)| !v.is_object() || k == "counters");
                walk_object(families, kind, &p, &l, fields, in_counters);
            }
        }
        _ => {}
    }
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
            "protocol": "udp",
            "ports": [{ "first": 80, "last": 80 }, { "first": 443, "last": 443 }],
            "listening_ports": 2,
            "healthy": true,
            "counters": { "rx_packets": 10, "drops": { "wrong_key": 2, "truncated": 0 } },
            "mappings": 42,
            "down_for_ms": 1500,
            "latency": { "p99_us": 2500 },
            "restarts": 1,
            "backends": [
                { "address": "10.0.0.101:80", "weight": 1, "state": "up",
                  "counters": { "connections": 7 } },
                { "address": "10.0.0.102:80", "weight": 2, "state": "down",
                  "counters": { "connections": 9, "checks_failed": 4, "down_transitions": 1,
                                "up_transitions": 0 } }
            ],
            "translations": [ { "proto": "tcp", "inside_local": "10.0.0.1:1" } ]
        });
        let running = Running {
            parts: vec![Box::new(Fake(status))],
            ..Running::default()
        };
        let text = render(&running);
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        has("# TYPE vipgate_lb_rx_packets_total counter");
        has(
            "# HELP vipgate_lb_rx_packets_total The count `counters.rx_packets` of `vipgate show lb --json`.",
        );
        has("vipgate_lb_rx_packets_total{service=\"web\"} 10");
        has("# TYPE vipgate_lb_drops_total counter");
        has("vipgate_lb_drops_total{service=\"web\",reason=\"wrong_key\"} 2");
        has("vipgate_lb_drops_total{service=\"web\",reason=\"truncated\"} 0");
        has("# TYPE vipgate_lb_mappings gauge");
        has("vipgate_lb_state{service=\"web\",state=\"up\"} 1");
        has("vipgate_lb_protocol{service=\"web\",protocol=\"udp\"} 1");
        // A multi-port service's ports count; the list itself is no series.
        has("vipgate_lb_listening_ports{service=\"web\"} 2");
        assert!(!text.contains("vipgate_lb_ports"), "{text}");
        has("vipgate_lb_healthy{service=\"web\"} 1");
        has("vipgate_lb_down_for_seconds{service=\"web\"} 1.5");
        has("vipgate_lb_latency_p99_seconds{service=\"web\"} 0.0025");
        has("# TYPE vipgate_lb_restarts_total counter");
        has("# TYPE vipgate_lb_backend_connections_total counter");
        has("vipgate_lb_backend_connections_total{service=\"web\",backend=\"10.0.0.102:80\"} 9");
        has("vipgate_lb_backend_state{service=\"web\",backend=\"10.0.0.101:80\",state=\"up\"} 1");
        // Health-check counters of a backend, as `show lb --json` has them.
        has("# TYPE vipgate_lb_backend_checks_failed_total counter");
        has("vipgate_lb_backend_checks_failed_total{service=\"web\",backend=\"10.0.0.102:80\"} 4");
        has(
            "vipgate_lb_backend_down_transitions_total{service=\"web\",backend=\"10.0.0.102:80\"} 1",
        );
        has("vipgate_lb_backend_up_transitions_total{service=\"web\",backend=\"10.0.0.102:80\"} 0");
        assert!(!text.contains("translations") && !text.contains("inside_local"));
        // Every family has exactly one HELP and one TYPE line, only counters end in _total,
        // and none ends in a histogram's or summary's suffix (promtool refuses that).
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = l.split(' ').skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
            assert!(
                !["_count", "_sum", "_bucket"]
                    .iter()
                    .any(|s| name.ends_with(s)),
                "{l}"
            );
            let help = format!("# HELP {name} ");
            assert_eq!(
                text.lines().filter(|l| l.starts_with(&help)).count(),
                1,
                "{l}"
            );
            assert_eq!(text.lines().filter(|x| x == &l).count(), 1, "{l}");
        }
    }

    #[test]
    fn vrrp_series_carry_vrid_and_interface() {
        struct Vrrp;
        impl Part for Vrrp {
            fn kind(&self) -> Kind {
                Kind::Vrrp
            }
            fn name(&self) -> String {
                "vip-web".into()
            }
            fn status(&self) -> Value {
                serde_json::json!({"vrid": 51, "interface": "eth0", "state": "MASTER",
                    "counters": {"adverts_tx": 3}})
            }
            fn stop(self: Box<Self>) -> BoxFuture<()> {
                Box::pin(async {})
            }
        }
        let running = Running {
            parts: vec![Box::new(Vrrp)],
            ..Running::default()
        };
        let text = render(&running);
        assert!(
            text.contains("vipgate_vrrp_adverts_tx_total{instance=\"vip-web\",vrid=\"51\",interface=\"eth0\"} 3"),
            "{text}"
        );
        assert!(!text.contains("vipgate_vrrp_vrid"), "{text}");
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
