//! The control socket: `vipgate status`, `show`, `nat clear`, `lb weight` talk to a running
//! `vipgate run` over a unix socket, one JSON request line and one JSON response line each.
//!
//! Access: the socket is 0600 (0660 with `[daemon] control_group`) in a directory created
//! 0700 (0750) and refused if world-writable, and every connection's peer credentials
//! (SO_PEERCRED) are checked: root and the daemon's own uid may do anything, members of
//! `control_group` only the read-only `status` and `show`, anyone else is refused. Only a
//! socket is ever removed at the path. Bounds: at most [`MAX_CONNECTIONS`] connections at
//! once, a request line of at most [`MAX_LINE`] bytes read within [`READ_TIMEOUT`], and
//! accept errors (EMFILE) back off instead of spinning.

use crate::parts::{Kind, Running};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddrV4;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::RwLock;

/// A request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Request {
    /// Every part's status.
    Status,
    /// The statuses of one kind.
    Show { kind: Kind },
    /// Re-read the config file and apply the differences (`vipgate reload`, like SIGHUP).
    Reload,
    /// Re-exec the daemon in place, the kernel path's flows kept (`vipgate restart`).
    Restart,
    /// An operator command for the parts it names.
    Control { command: ControlOp },
}

/// An operator command (`vipgate nat clear`, `vipgate lb weight`), typed end to end: the
/// client builds it, serde checks it at the socket, and [`crate::parts::Part::control`]
/// matches on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ControlOp {
    /// Drop every dynamic translation of the PAT gateway.
    NatClear,
    /// Set one backend's weight in one virtual service (0 drains it).
    LbWeight {
        service: String,
        backend: SocketAddrV4,
        weight: u16,
    },
    /// Give one backend `percent` % of a virtual service's new connections, the others
    /// sharing the rest in the ratios of their configured weights (`lb weight --canary`).
    LbCanary {
        service: String,
        backend: SocketAddrV4,
        percent: u8,
    },
    /// Add a backend to one virtual service (nothing persisted).
    LbAddBackend {
        service: String,
        backend: SocketAddrV4,
        weight: u16,
        max_connections: u32,
        min_connections: u32,
    },
    /// Remove a backend from one virtual service; its established flows run on.
    LbRemoveBackend {
        service: String,
        backend: SocketAddrV4,
    },
    /// Set a backend's operator state (ready, drain, maint).
    LbSetState {
        service: String,
        backend: SocketAddrV4,
        state: balance::AdminState,
    },
    /// List the flows of the virtual services (`show lb --connections`, read-only): those of
    /// `service` (every service: `None`), to `backend`, from `client`; at most `limit` per
    /// service.
    LbConnections {
        service: Option<String>,
        backend: Option<SocketAddrV4>,
        client: Option<std::net::Ipv4Addr>,
        limit: u32,
    },
    /// Set one VRRP instance's priority until a reload changes the file's (nothing persisted).
    VrrpSetPriority { instance: String, priority: u8 },
    /// Set the operator state of a backend of an HTTP listener's pool.
    HttpSetState {
        listener: String,
        pool: String,
        backend: SocketAddrV4,
        state: balance::AdminState,
    },
}

impl ControlOp {
    /// The kind of part that answers it.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            ControlOp::NatClear => Kind::Nat,
            ControlOp::LbWeight { .. }
            | ControlOp::LbCanary { .. }
            | ControlOp::LbAddBackend { .. }
            | ControlOp::LbRemoveBackend { .. }
            | ControlOp::LbSetState { .. }
            | ControlOp::LbConnections { .. } => Kind::Lb,
            ControlOp::VrrpSetPriority { .. } => Kind::Vrrp,
            ControlOp::HttpSetState { .. } => Kind::Http,
        }
    }

    /// Whether it only reads (members of `control_group` may send it).
    pub(crate) fn is_read_only(&self) -> bool {
        matches!(self, ControlOp::LbConnections { .. })
    }

    /// The one part it is for; `None`: every part of [`ControlOp::kind`].
    pub(crate) fn target(&self) -> Option<&str> {
        match self {
            ControlOp::NatClear => None,
            ControlOp::LbWeight { service, .. }
            | ControlOp::LbCanary { service, .. }
            | ControlOp::LbAddBackend { service, .. }
            | ControlOp::LbRemoveBackend { service, .. }
            | ControlOp::LbSetState { service, .. } => Some(service),
            ControlOp::LbConnections { service, .. } => service.as_deref(),
            ControlOp::VrrpSetPriority { instance, .. } => Some(instance),
            ControlOp::HttpSetState { listener, .. } => Some(listener),
        }
    }
}

impl std::fmt::Display for ControlOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlOp::NatClear => "nat clear",
            ControlOp::LbWeight { .. } => "lb weight",
            ControlOp::LbCanary { .. } => "lb weight --canary",
            ControlOp::LbAddBackend { .. } => "lb add-backend",
            ControlOp::LbRemoveBackend { .. } => "lb remove-backend",
            ControlOp::LbSetState { .. } => "lb set state",
            ControlOp::LbConnections { .. } => "show lb --connections",
            ControlOp::VrrpSetPriority { .. } => "vrrp set-priority",
            ControlOp::HttpSetState { .. } => "http set state",
        })
    }
}

/// A response on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Response {
    pub(crate) ok: bool,
    #[serde(default)]
    pub(crate) result: serde_json::Value,
    #[serde(default)]
    pub(crate) error: Option<String>,
}

/// One entry of a status response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PartStatus {
    pub(crate) kind: Kind,
    pub(crate) name: String,
    pub(crate) status: serde_json::Value,
}

/// A reload asked for over the socket: the run loop answers with its report or the errors.
pub(crate) type ReloadRequest = tokio::sync::oneshot::Sender<Result<Vec<String>, String>>;

/// A restart asked for over the socket: the run loop answers (`Err`: refused, the daemon
/// stays), and re-execs once the answer is written or the client is gone.
#[derive(Debug)]
pub(crate) struct RestartRequest {
    /// The run loop's answer.
    pub(crate) reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    /// Closed once the answer is written to the client.
    pub(crate) answered: tokio::sync::oneshot::Receiver<()>,
}

/// Connections served at once; more wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// Longest request line accepted.
pub(crate) const MAX_LINE: u64 = 64 * 1024;
/// A client must send its request line within this.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a connecting peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Root or the daemon's uid.
    Full,
    /// A member of `control_group`: status and show.
    ReadOnly,
}

/// Decides from the peer's credentials; `None` refuses.
fn access_of(
    uid: u32,
    groups: impl IntoIterator<Item = u32>,
    control_group: Option<u32>,
) -> Option<Access> {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Some(Access::Full);
    }
    let group = control_group?;
    groups
        .into_iter()
        .any(|g| g == group)
        .then_some(Access::ReadOnly)
}

/// The peer's gid and supplementary groups (from /proc, as the kernel holds them).
fn peer_groups(pid: Option<i32>, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    if let Some(pid) = pid
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups.extend(
            line.trim_start_matches("Groups:")
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    groups
}

/// Serves the control socket until the task is aborted; removes the socket file on drop.
pub(crate) struct ControlServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    /// Binds the socket (creating its directory) and starts answering.
    ///
    /// # Errors
    /// Another daemon already listens there, or the path cannot be bound.
    pub(crate) async fn start(
        path: &Path,
        control_group: Option<u32>,
        running: Arc<RwLock<Running>>,
        reload: tokio::sync::mpsc::Sender<ReloadRequest>,
        restart: tokio::sync::mpsc::Sender<RestartRequest>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            prepare_dir(dir, control_group.is_some())?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; vipgate only replaces a stale socket",
                    path.display()
                );
            }
            if UnixStream::connect(path).await.is_ok() {
                bail!(
                    "another vipgate daemon already answers on {}",
                    path.display()
                );
            }
            // A stale socket from a daemon that died: safe to replace.
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        let mode = if control_group.is_some() {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        if let Some(gid) = control_group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("giving {} to gid {gid}", path.display()))?;
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let running = running.clone();
                let loop_requests = (reload.clone(), restart.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = serve_one(stream, control_group, running, loop_requests).await {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
            }
        });
        Ok(ControlServer {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the socket's directory 0700 (0750 with a control group) if missing; refuses a
/// world-writable one, where anyone could replace the socket.
fn prepare_dir(dir: &Path, group: bool) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if group { 0o750 } else { 0o700 })
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.permissions().mode() & 0o002 != 0 {
        bail!(
            "the control socket's directory {} is world-writable; anyone could replace the socket",
            dir.display()
        );
    }
    Ok(())
}

fn refused(message: String) -> Response {
    Response {
        ok: false,
        result: serde_json::Value::Null,
        error: Some(message),
    }
}

async fn serve_one(
    stream: UnixStream,
    control_group: Option<u32>,
    running: Arc<RwLock<Running>>,
    (reload, restart): (
        tokio::sync::mpsc::Sender<ReloadRequest>,
        tokio::sync::mpsc::Sender<RestartRequest>,
    ),
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("reading peer credentials")?;
    let access = access_of(
        cred.uid(),
        peer_groups(cred.pid(), cred.gid()),
        control_group,
    );
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_LINE));
    let read = reader.read_line(&mut line);
    let request = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => Err(format!(
            "no request line within {}s",
            READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => Err(format!(
            "the request line is longer than {MAX_LINE} bytes or unterminated"
        )),
        Ok(Ok(_)) => {
            serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}"))
        }
    };
    let allowed = match (&request, access) {
        (_, None) => Err(format!(
            "permission denied: uid {} may not use this control socket (root, the daemon's user and, for status and show, members of [daemon] control_group may)",
            cred.uid()
        )),
        (Ok(Request::Status | Request::Show { .. }) | Err(_), Some(Access::ReadOnly))
        | (_, Some(Access::Full)) => Ok(()),
        (Ok(Request::Control { command }), Some(Access::ReadOnly)) if command.is_read_only() => {
            Ok(())
        }
        (Ok(_), Some(Access::ReadOnly)) => Err(format!(
            "permission denied: uid {} (a member of [daemon] control_group) may only use status and show",
            cred.uid()
        )),
    };
    let request = allowed.and(request);
    let response = match request.map_err(refused) {
        Ok(Request::Reload) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let outcome = match reload.send(tx).await {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Err("the daemon is stopping".into())),
                Err(_) => Err("the daemon is stopping".into()),
            };
            match outcome {
                Ok(report) => Response {
                    ok: true,
                    result: serde_json::json!(report),
                    error: None,
                },
                Err(e) => Response {
                    ok: false,
                    result: serde_json::Value::Null,
                    error: Some(e),
                },
            }
        }
        Ok(Request::Restart) => {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            let (written, answered) = tokio::sync::oneshot::channel::<()>();
            let outcome = match restart.send(RestartRequest { reply, answered }).await {
                Ok(()) => outcome
                    .await
                    .unwrap_or_else(|_| Err("the daemon is stopping".into())),
                Err(_) => Err("the daemon is stopping".into()),
            };
            let response = match outcome {
                Ok(message) => Response {
                    ok: true,
                    result: serde_json::json!(message),
                    error: None,
                },
                Err(e) => refused(e),
            };
            let mut out = serde_json::to_vec(&response)?;
            out.push(b'\n');
            let sent = w.write_all(&out).await;
            // The run loop re-execs once this is dropped: after the answer left.
            drop(written);
            return Ok(sent?);
        }
        Ok(req) => answer(req, &*running.read().await),
        Err(response) => response,
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

fn answer(req: Request, running: &Running) -> Response {
    let result = match req {
        Request::Status => Ok(serde_json::to_value(
            running
                .summaries()
                .into_iter()
                .map(|(kind, name, status)| PartStatus { kind, name, status })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default()),
        Request::Show { kind } => Ok(serde_json::Value::Array(running.statuses(kind))),
        Request::Reload | Request::Restart => Err(anyhow::anyhow!(
            "reload and restart are handled by the run loop"
        )),
        Request::Control { command } => {
            let kind = command.kind();
            let name = command.target();
            let targets: Vec<_> = running
                .parts
                .iter()
                .filter(|p| p.kind() == kind && name.is_none_or(|n| n == p.name()))
                .collect();
            if targets.is_empty() {
                Err(anyhow::anyhow!(
                    "no running {kind} part{}",
                    name.map(|n| format!(" named `{n}`")).unwrap_or_default()
                ))
            } else {
                targets
                    .iter()
                    .map(|p| p.control(&command))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map(serde_json::Value::Array)
            }
        }
    };
    match result {
        Ok(result) => Response {
            ok: true,
            result,
            error: None,
        },
        Err(e) => Response {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("{e:#}")),
        },
    }
}

/// Sends one request to the daemon at `path` and returns its result.
///
/// # Errors
/// No daemon listening (with a hint), or the daemon's own error message.
pub(crate) async fn request(path: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        anyhow::anyhow!(
            "no vipgate daemon answers on {} ({e}); start one with `vipgate run -c FILE`, or point at it with --control PATH or -c FILE",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let resp: Response = serde_json::from_str(&line).context("daemon sent a malformed response")?;
    if resp.ok {
        Ok(resp.result)
    } else {
        bail!(
            "{}",
            resp.error
                .unwrap_or_else(|| "daemon refused the request".into())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parts::{BoxFuture, Part};

    struct FakeTunnel;

    impl Part for FakeTunnel {
        fn kind(&self) -> Kind {
            Kind::Gre
        }
        fn name(&self) -> String {
            "gre-br".into()
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "name": "gre-br", "state": "up" })
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    struct FakeGateway;

    impl Part for FakeGateway {
        fn kind(&self) -> Kind {
            Kind::Nat
        }
        fn name(&self) -> String {
            "nat".into()
        }
        fn status(&self) -> serde_json::Value {
            serde_json::json!({ "name": "nat" })
        }
        fn control(&self, op: &ControlOp) -> anyhow::Result<serde_json::Value> {
            match op {
                ControlOp::NatClear => Ok(serde_json::json!({ "cleared": 7 })),
                _ => {
                    anyhow::bail!("unsupported `{op}`")
                }
            }
        }
        fn stop(self: Box<Self>) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn status_show_and_control_round_trip() {
        let dir = std::env::temp_dir().join(format!("vipgate-control-{}", std::process::id()));
        let path = dir.join("ctl.sock");
        let running = Arc::new(RwLock::new(Running {
            parts: vec![Box::new(FakeTunnel), Box::new(FakeGateway)],
            ..Running::default()
        }));
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(1);
        tokio::spawn(async move {
            while let Some(reply) = reload_rx.recv().await {
                let _ = reply.send(Err("site.toml:1:1: planted".into()));
            }
        });
        let (restart_tx, mut restart_rx) = tokio::sync::mpsc::channel::<RestartRequest>(1);
        let (answered_tx, answered_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let req = restart_rx.recv().await.unwrap();
            let _ = req.reply.send(Err("restart refused: planted".into()));
            // The run loop learns when the answer has left (the sender side is dropped).
            let _ = req.answered.await;
            let _ = answered_tx.send(());
        });
        let server = ControlServer::start(
            &path,
            None,
            running.clone(),
            reload_tx.clone(),
            restart_tx.clone(),
        )
        .await
        .unwrap();
        let reload = request(&path, &Request::Reload)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(reload, "site.toml:1:1: planted");
        let restart = request(&path, &Request::Restart)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(restart, "restart refused: planted");
        answered_rx.await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // An endless line is cut at MAX_LINE and answered with an error, not buffered.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        let junk = vec![b'x'; usize::try_from(MAX_LINE).unwrap() + 10];
        let _ = raw.write_all(&junk).await;
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).await.unwrap();
        assert!(answer.contains("longer than"), "{answer}");

        let status = request(&path, &Request::Status).await.unwrap();
        let parts: Vec<PartStatus> = serde_json::from_value(status).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].status["state"], "up");

        let show = request(&path, &Request::Show { kind: Kind::Gre })
            .await
            .unwrap();
        assert_eq!(show[0]["name"], "gre-br");
        let empty = request(&path, &Request::Show { kind: Kind::Vrrp })
            .await
            .unwrap();
        assert_eq!(empty, serde_json::json!([]));

        let clear = Request::Control {
            command: ControlOp::NatClear,
        };
        assert_eq!(
            request(&path, &clear).await.unwrap(),
            serde_json::json!([{ "cleared": 7 }])
        );
        let weight = Request::Control {
            command: ControlOp::LbWeight {
                service: "web".into(),
                backend: "10.0.0.1:80".parse().unwrap(),
                weight: 3,
            },
        };
        assert!(
            request(&path, &weight)
                .await
                .unwrap_err()
                .to_string()
                .contains("no running lb part named `web`")
        );
        // The socket refuses what the type cannot hold, before any part sees it.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(
            b"{\"op\":\"control\",\"command\":{\"lb_weight\":{\"service\":\"web\",\"backend\":\"10.0.0.1:80\",\"weight\":65536}}}\n",
        )
        .await
        .unwrap();
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).await.unwrap();
        let answer: Response = serde_json::from_str(&answer).unwrap();
        assert!(
            !answer.ok
                && answer
                    .error
                    .as_ref()
                    .is_some_and(|e| e.starts_with("bad request")),
            "{answer:?}"
        );

        // A second daemon on the same socket is refused; after the first stops the socket is gone.
        let second = ControlServer::start(
            &path,
            None,
            running.clone(),
            reload_tx.clone(),
            restart_tx.clone(),
        )
        .await;
        assert!(
            second
                .err()
                .unwrap()
                .to_string()
                .contains("already answers")
        );
        drop(server);
        assert!(!path.exists());
        // Anything but a socket at the path is never removed.
        std::fs::write(&path, "precious").unwrap();
        let refused = ControlServer::start(
            &path,
            None,
            running.clone(),
            reload_tx.clone(),
            restart_tx.clone(),
        )
        .await;
        assert!(refused.err().unwrap().to_string().contains("not a socket"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_file(&path).unwrap();
        assert!(
            request(&path, &Request::Status)
                .await
                .unwrap_err()
                .to_string()
                .contains("no vipgate daemon answers")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peer_credentials_decide_access() {
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(access_of(0, [0], None), Some(Access::Full));
        assert_eq!(access_of(me, [1234], None), Some(Access::Full));
        assert_eq!(
            access_of(4321, [4321, 99], Some(99)),
            Some(Access::ReadOnly)
        );
        assert_eq!(access_of(4321, [4321], Some(99)), None);
        assert_eq!(access_of(4321, [4321, 99], None), None);
    }

    #[test]
    fn directory_rules() {
        let dir = std::env::temp_dir().join(format!("vipgate-ctldir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        prepare_dir(&dir.join("a"), false).unwrap();
        let mode = std::fs::metadata(dir.join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        prepare_dir(&dir.join("g"), true).unwrap();
        let mode = std::fs::metadata(dir.join("g"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o750);
        std::fs::set_permissions(dir.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&dir.join("a"), false).unwrap_err().to_string();
        assert!(e.contains("world-writable"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
