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
use tokio::sync::{mpsc, oneshot, watch};

use super::copy::ForwardCounters;
use super::lock;
use crate::config::{AllocatedPort, ClientConfig, ForwardKind, ForwardStatus, Keepalive};
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
}

impl RemoteForward {
    pub(crate) fn new(spec: ForwardSpec) -> Self {
        RemoteForward {
            spec,
            counters: Arc::default(),
            bound_port: AtomicU64::new(0),
            last_allocated: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_down(&self) {
        self.bound_port.store(0, Ordering::Relaxed);
        self.listening.store(false, Ordering::Relaxed);
    }

    /// Its line in `vipgate show ssh`; `bound` is where the server listens, empty while it
    /// does not.
    pub(crate) fn status(&self) -> ForwardStatus {
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
        self.counters
            .status(ForwardKind::Remote, self.spec.to_string(), bound)
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
