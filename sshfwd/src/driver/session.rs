//! The state one destination's tasks share: its connection pool, its `-R` forwards, its
//! status, and the rule that picks a connection for a new channel.
//!
//! The pool has one slot per connection thread (see [`super::worker`]); a slot is `None`
//! while its connection is down. The connection handler's type is declared here, beside the
//! pool that holds its handles; what russh calls on it is in [`super::handler`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::client::{self, Handle};
use russh::keys::{Certificate, PrivateKey};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::copy::ForwardCounters;
use super::lock;
use crate::backoff::{Backoff, BackoffConfig};
use crate::config::{
    AllocatedPort, ClientConfig, ForwardKind, ForwardState, ForwardStatus, Keepalive,
    PendingForward,
};
use crate::spec::{Endpoint, ForwardSpec};

/// One SSH connection per slot, `None` while that slot is reconnecting.
pub(crate) type Pool = Vec<Option<Arc<Handle<ClientHandler>>>>;

/// A loaded identity file and the certificate that goes with it (`CertificateFile`, or the
/// `-cert.pub` file beside it, as OpenSSH picks it up).
pub(crate) struct Identity {
    pub(crate) path: PathBuf,
    pub(crate) key: Arc<PrivateKey>,
    pub(crate) cert: Option<(PathBuf, Certificate)>,
}

/// What the supervisors, listeners and handlers of one destination share.
pub(crate) struct Shared {
    /// The config the destination was started with (reloads that need none of its
    /// connection settings changed never replace it).
    pub(crate) cfg: ClientConfig,
    pub(crate) russh: Arc<client::Config>,
    pub(crate) keys: Vec<Identity>,
    /// The identities of each `ProxyJump` hop, in `cfg.jump` order.
    pub(crate) jump_keys: Vec<Vec<Identity>>,
    pub(crate) pool: watch::Sender<Pool>,
    /// Round-robin position of [`pick`] over the live connections.
    pub(crate) next: AtomicUsize,
    pub(crate) remote: Mutex<Vec<Arc<RemoteForward>>>,
    pub(crate) keepalive: watch::Sender<Keepalive>,
    pub(crate) state: Mutex<State>,
    /// Why the handler refused the host key on the connection being made, if it did.
    pub(crate) host_key_refusal: Mutex<Option<String>>,
    pub(crate) allocated_tx: mpsc::UnboundedSender<AllocatedPort>,
    /// The runtime of each connection slot's thread (see [`super::worker`]).
    pub(crate) runtimes: Vec<tokio::runtime::Handle>,
    /// Round-robin position of [`Shared::next_slot`].
    pub(crate) next_slot: AtomicUsize,
    /// Woken when a `-R` is refused, so that the retry loop of the live connection
    /// schedules it.
    pub(crate) refused_wake: Notify,
    /// `-R` requests sent and not yet answered. The server may open a channel for a forward
    /// the moment it binds, and russh hands us that channel before the task that sent the
    /// request has seen the reply and marked the forward listening: such a channel waits
    /// until the answers are in (see `handler.rs`).
    pub(crate) forward_requests_in_flight: watch::Sender<u32>,
    /// The `-L` forwards now configured (the start config's, then each reload's): what the
    /// probes open channels to.
    pub(crate) local: Mutex<Vec<ForwardSpec>>,
    /// Probes of single forwards since start, and those that failed.
    pub(crate) probes: AtomicU64,
    pub(crate) probe_failures: AtomicU64,
}

/// One `-R` request in [`Shared::forward_requests_in_flight`]; dropped once its answer has
/// been applied to the forward.
pub(crate) struct InFlight<'a>(&'a watch::Sender<u32>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// How the destination's connection (slot 0) has fared, for status.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) connected_at: Option<Instant>,
    pub(crate) reconnects: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) stopped: bool,
}

impl Shared {
    /// Counts one `-R` request as in flight until the returned guard drops.
    pub(crate) fn forward_request_in_flight(&self) -> InFlight<'_> {
        self.forward_requests_in_flight
            .send_modify(|n| *n = n.saturating_add(1));
        InFlight(&self.forward_requests_in_flight)
    }

    /// The slot whose thread takes the next accepted connection, round-robin.
    pub(crate) fn next_slot(&self) -> usize {
        self.next_slot.fetch_add(1, Ordering::Relaxed) % self.runtimes.len()
    }

    /// The `-R` forwards now configured.
    pub(crate) fn remotes(&self) -> Vec<Arc<RemoteForward>> {
        lock(&self.remote).clone()
    }
}

/// A live connection to carry one more channel: the one of `slot` (whose thread runs the
/// caller) when it is up, else round-robin over the pool; waits for a reconnect up to
/// `connect_timeout`.
pub(crate) async fn pick(shared: &Shared, slot: usize) -> Option<Arc<Handle<ClientHandler>>> {
    if let Some(Some(h)) = shared.pool.borrow().get(slot)
        && !h.is_closed()
    {
        return Some(h.clone());
    }
    let mut rx = shared.pool.subscribe();
    let live = |p: &Pool| p.iter().any(|h| h.as_ref().is_some_and(|h| !h.is_closed()));
    tokio::time::timeout(shared.cfg.connect_timeout, rx.wait_for(live))
        .await
        .ok()?
        .ok()?;
    let pool = rx.borrow();
    let live: Vec<_> = pool.iter().flatten().filter(|h| !h.is_closed()).collect();
    if live.is_empty() {
        return None;
    }
    let i = shared.next.fetch_add(1, Ordering::Relaxed) % live.len();
    Some(live[i].clone())
}

/// One `-R` forward and what the server made of it on the current connection.
pub(crate) struct RemoteForward {
    pub(crate) spec: ForwardSpec,
    pub(crate) counters: Arc<ForwardCounters>,
    /// Port the server listens on now (the spec's, or the allocated one), 0 while down.
    pub(crate) bound_port: AtomicU64,
    /// Port the server allocated last time, asked for again after a reconnect.
    pub(crate) last_allocated: AtomicU64,
    /// The server accepted the forward on the current connection.
    pub(crate) listening: AtomicBool,
    /// Set while the server refuses the forward on the live connection.
    pub(crate) refused: Mutex<Option<Refused>>,
    /// Channels the server opened for this forward since start: a probe sees its own come
    /// back here.
    pub(crate) arrivals: watch::Sender<u64>,
}

/// A `-R` the server refused on the live connection, and when to ask again.
pub(crate) struct Refused {
    /// ssh's wording, without the server's (unbounded) text.
    pub(crate) reason: String,
    pub(crate) attempts: u64,
    /// Delays between requests: `ClientConfig::backoff`, bounded by its `max`.
    pub(crate) backoff: Backoff,
    pub(crate) next_at: Instant,
}

/// What a refusal changed, so that the caller logs state changes and not every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalChange {
    /// The forward was not pending before this refusal.
    NowPending,
    /// It was already pending; one more attempt counted.
    StillPending,
}

impl RemoteForward {
    pub(crate) fn new(spec: ForwardSpec) -> Self {
        RemoteForward {
            spec,
            counters: Arc::default(),
            bound_port: AtomicU64::new(0),
            last_allocated: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            refused: Mutex::new(None),
            arrivals: watch::Sender::new(0),
        }
    }

    /// The connection is gone: nothing listens, and nothing is retried until the next one.
    pub(crate) fn set_down(&self) {
        self.bound_port.store(0, Ordering::Relaxed);
        self.listening.store(false, Ordering::Relaxed);
        *lock(&self.refused) = None;
    }

    /// The server refused the forward at `now`: schedules the next request with `backoff`.
    pub(crate) fn set_refused(
        &self,
        backoff: BackoffConfig,
        now: Instant,
        random: u64,
    ) -> RefusalChange {
        self.bound_port.store(0, Ordering::Relaxed);
        self.listening.store(false, Ordering::Relaxed);
        let mut refused = lock(&self.refused);
        let change = if refused.is_some() {
            RefusalChange::StillPending
        } else {
            RefusalChange::NowPending
        };
        let r = refused.get_or_insert_with(|| Refused {
            reason: self.refusal_reason(),
            attempts: 0,
            backoff: Backoff::new(backoff),
            next_at: now,
        });
        r.attempts = r.attempts.saturating_add(1);
        r.next_at = now + r.backoff.on_disconnected(now, random);
        change
    }

    /// The server accepted the forward; returns the refused attempts before, if any.
    pub(crate) fn set_listening(&self, port: u64) -> Option<u64> {
        self.bound_port.store(port, Ordering::Relaxed);
        self.listening.store(true, Ordering::Relaxed);
        lock(&self.refused).take().map(|r| r.attempts)
    }

    /// When a refused forward is due to be asked for again; `None` unless it is pending.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        lock(&self.refused).as_ref().map(|r| r.next_at)
    }

    /// ssh's words for a refused forward (`remote port forwarding failed for listen port P`).
    pub(crate) fn refusal_reason(&self) -> String {
        match &self.spec.listen {
            Endpoint::Tcp { port, .. } => {
                format!("remote port forwarding failed for listen port {port}")
            }
            Endpoint::Unix(path) => {
                format!("remote port forwarding failed for listen path {path}")
            }
        }
    }

    /// Its line in `vipgate show ssh` at `now`; `bound` is where the server listens, empty
    /// while it does not.
    pub(crate) fn status(&self, now: Instant) -> ForwardStatus {
        let port = self.bound_port.load(Ordering::Relaxed);
        let bound = if !self.listening.load(Ordering::Relaxed) {
            String::new()
        } else if let Endpoint::Unix(path) = &self.spec.listen {
            path.clone()
        } else {
            let host = match &self.spec.listen {
                Endpoint::Tcp { host: Some(h), .. } => h.clone(),
                _ => "localhost".to_string(),
            };
            format!(
                "{}:{port}",
                if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                }
            )
        };
        let mut status = self
            .counters
            .status(ForwardKind::Remote, self.spec.to_string(), bound);
        if let Some(r) = lock(&self.refused).as_ref() {
            status.state = ForwardState::Pending;
            status.pending = Some(PendingForward {
                reason: r.reason.clone(),
                attempts: r.attempts,
                next_retry: Some(r.next_at.saturating_duration_since(now)),
            });
        } else if !self.listening.load(Ordering::Relaxed) {
            status.state = ForwardState::Down;
        }
        status
    }
}

/// russh's handler for one connection of the destination.
pub(crate) struct ClientHandler {
    pub(crate) shared: Arc<Shared>,
    /// Dropped with the session task: the supervisor's receiver then sees the connection end.
    _closed: oneshot::Sender<()>,
}

/// russh's callbacks on a `ProxyJump` hop's connection: only its host key is checked (under
/// the hop's own name); it carries no forwards of its own.
pub(crate) struct JumpHandler {
    pub(crate) shared: Arc<Shared>,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl JumpHandler {
    pub(crate) fn new(shared: Arc<Shared>, host: &str, port: u16) -> Self {
        JumpHandler {
            shared,
            host: host.to_string(),
            port,
        }
    }
}

impl ClientHandler {
    pub(crate) fn new(shared: Arc<Shared>, closed: oneshot::Sender<()>) -> Self {
        ClientHandler {
            shared,
            _closed: closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A server that refuses forever: one state change, attempts counted, delays bounded by
    /// the schedule's max, constant memory; a bind and a lost connection clear it.
    #[test]
    fn refusals_back_off_within_bounds_and_report_one_change() {
        let r = RemoteForward::new(ForwardSpec::parse_remote("9100:127.0.0.1:80").unwrap());
        let cfg = BackoffConfig {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            stable_after: Duration::from_secs(30),
        };
        let mut now = testkit::epoch();
        let mut changes = Vec::new();
        for i in 0..1000u64 {
            changes.push(r.set_refused(cfg, now, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
            let due = r.retry_at().unwrap();
            assert!(due > now && due - now <= cfg.max, "attempt {i}");
            now = due;
        }
        assert_eq!(changes[0], RefusalChange::NowPending);
        assert!(
            changes[1..]
                .iter()
                .all(|c| *c == RefusalChange::StillPending)
        );
        let status = r.status(now);
        assert_eq!(status.state, ForwardState::Pending);
        let pending = status.pending.unwrap();
        assert_eq!(pending.attempts, 1000);
        assert_eq!(
            pending.reason,
            "remote port forwarding failed for listen port 9100"
        );
        assert_eq!(r.set_listening(9100), Some(1000));
        assert_eq!(r.status(now).state, ForwardState::Listening);
        assert_eq!(r.status(now).bound, "localhost:9100");
        r.set_refused(cfg, now, 0);
        r.set_down();
        assert_eq!(r.retry_at(), None);
        assert_eq!(r.status(now).state, ForwardState::Down);
    }
}
