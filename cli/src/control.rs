//! The control socket: `vipgate status`, `show`, `nat clear`, `lb weight` talk to a running
//! `vipgate run` over a unix socket, one JSON request line and one JSON response line each.

use crate::parts::{Kind, Running};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    /// An operator command for the parts of one kind (optionally one named part).
    Control {
        kind: Kind,
        #[serde(default)]
        name: Option<String>,
        cmd: String,
        #[serde(default)]
        args: serde_json::Value,
    },
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
        running: Arc<RwLock<Running>>,
        reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
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
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let running = running.clone();
                let reload = reload.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, running, reload).await {
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

async fn serve_one(
    stream: UnixStream,
    running: Arc<RwLock<Running>>,
    reload: tokio::sync::mpsc::Sender<ReloadRequest>,
) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
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
        Ok(req) => answer(req, &*running.read().await),
        Err(e) => Response {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("bad request: {e}")),
        },
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
                .parts
                .iter()
                .map(|p| PartStatus {
                    kind: p.kind(),
                    name: p.name(),
                    status: p.summary(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default()),
        Request::Show { kind } => Ok(serde_json::Value::Array(running.statuses(kind))),
        Request::Reload => Err(anyhow::anyhow!("reload is handled by the run loop")),
        Request::Control {
            kind,
            name,
            cmd,
            args,
        } => {
            let targets: Vec<_> = running
                .parts
                .iter()
                .filter(|p| p.kind() == kind && name.as_ref().is_none_or(|n| *n == p.name()))
                .collect();
            if targets.is_empty() {
                Err(anyhow::anyhow!(
                    "no running {kind} part{}",
                    name.map(|n| format!(" named `{n}`")).unwrap_or_default()
                ))
            } else {
                targets
                    .iter()
                    .map(|p| p.control(&cmd, &args))
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
        fn control(&self, op: &str, args: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
            match op {
                "echo" => Ok(args.clone()),
                _ => anyhow::bail!("unsupported `{op}`"),
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
            parts: vec![Box::new(FakeTunnel)],
        }));
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(1);
        tokio::spawn(async move {
            while let Some(reply) = reload_rx.recv().await {
                let _ = reply.send(Err("site.toml:1:1: planted".into()));
            }
        });
        let server = ControlServer::start(&path, running.clone(), reload_tx.clone())
            .await
            .unwrap();
        let reload = request(&path, &Request::Reload)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(reload, "site.toml:1:1: planted");

        let status = request(&path, &Request::Status).await.unwrap();
        let parts: Vec<PartStatus> = serde_json::from_value(status).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].status["state"], "up");

        let show = request(&path, &Request::Show { kind: Kind::Gre })
            .await
            .unwrap();
        assert_eq!(show[0]["name"], "gre-br");
        let empty = request(&path, &Request::Show { kind: Kind::Vrrp })
            .await
            .unwrap();
        assert_eq!(empty, serde_json::json!([]));

        let echo = Request::Control {
            kind: Kind::Gre,
            name: None,
            cmd: "echo".into(),
            args: serde_json::json!(7),
        };
        assert_eq!(request(&path, &echo).await.unwrap(), serde_json::json!([7]));
        let bad = Request::Control {
            kind: Kind::Nat,
            name: None,
            cmd: "clear".into(),
            args: serde_json::Value::Null,
        };
        assert!(
            request(&path, &bad)
                .await
                .unwrap_err()
                .to_string()
                .contains("no running nat part")
        );

        // A second daemon on the same socket is refused; after the first stops the socket is gone.
        let second = ControlServer::start(&path, running, reload_tx).await;
        assert!(
            second
                .err()
                .unwrap()
                .to_string()
                .contains("already answers")
        );
        drop(server);
        assert!(!path.exists());
        assert!(
            request(&path, &Request::Status)
                .await
                .unwrap_err()
                .to_string()
                .contains("no vipgate daemon answers")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
