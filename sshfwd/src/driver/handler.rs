//! What russh calls on a client connection (the destination's, and each `ProxyJump` hop's):
//! host key (or host certificate, against `@cert-authority` lines) verification against
//! known_hosts
//! (recording a first-seen key under an exclusive lock), the channels the server opens for
//! `-R` forwards, and the disconnect reason.
//!
//! A refused host key leaves its reason in `Shared::host_key_refusal`, so that the
//! connection attempt fails with it instead of russh's generic error.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use russh::client::{self, ChannelOpenHandle, Msg, Session};
use russh::keys::{HashAlg, PublicKey, PublicKeyBase64};
use russh::{Channel, ChannelOpenFailure};

use super::certs;
use super::forward::serve_remote;
use super::lock;
use super::session::{ClientHandler, JumpHandler, RemoteForward, Shared};
use crate::error::SshFwdError;
use crate::known_hosts::{self, Decision};
use crate::spec::Endpoint;

/// How long a channel the server opened while `-R` requests were unanswered waits for their
/// answers before it is judged: the server sends the answer first, so this only bounds a
/// server that never answers.
const AWAIT_FORWARD_ANSWERS: Duration = Duration::from_secs(10);

/// At most this many such channels wait at once; more are judged at once (a server opening
/// channels in a loop must not grow our memory).
const MAX_CHANNELS_AWAITING_ANSWERS: usize = 64;

impl ClientHandler {
    /// Serves a channel the server opened for one of our `-R` forwards (the one `find`
    /// returns), or refuses one we never asked for; `asked_for` names what the server
    /// claimed, for the log.
    ///
    /// While `-R` requests are unanswered, a channel that matches none waits for their answers
    /// (on its own task: the session's event loop goes on) and is judged after: OpenSSH binds
    /// and may accept a connection before russh has handed its reply to the task that asked.
    fn serve_or_refuse(
        &self,
        find: impl Fn(&Shared) -> Option<Arc<RemoteForward>> + Send + 'static,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        asked_for: String,
    ) {
        let shared = self.shared.clone();
        if let Some(remote) = find(&shared) {
            serve(shared, remote, channel, reply);
            return;
        }
        let in_flight = &shared.forward_requests_in_flight;
        if *in_flight.borrow() == 0 || in_flight.receiver_count() >= MAX_CHANNELS_AWAITING_ANSWERS {
            tokio::spawn(refuse(shared, reply, asked_for));
            return;
        }
        let mut answers = in_flight.subscribe();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(AWAIT_FORWARD_ANSWERS, answers.wait_for(|n| *n == 0)).await;
            drop(answers);
            match find(&shared) {
                Some(remote) => serve(shared, remote, channel, reply),
                None => refuse(shared, reply, asked_for).await,
            }
        });
    }
}

/// Serves a channel of `remote` on its own task: connecting locally may take a while, and
/// the session's event loop must not wait for it.
fn serve(
    shared: Arc<Shared>,
    remote: Arc<RemoteForward>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
) {
    remote.arrivals.send_modify(|n| *n = n.wrapping_add(1));
    tokio::spawn(serve_remote(shared, remote, channel, reply));
}

async fn refuse(shared: Arc<Shared>, reply: ChannelOpenHandle, asked_for: String) {
    tracing::warn!(
        "{}: server opened a forwarded channel for {asked_for}, which we did not ask for; refused",
        shared.cfg.name,
    );
    reply
        .reject(ChannelOpenFailure::AdministrativelyProhibited)
        .await;
}

/// Checks a server's host key or host certificate against known_hosts under `host`:`port`,
/// recording a first-seen key when the policy allows; a refusal leaves its reason in
/// `Shared::host_key_refusal`.
fn check_key(
    shared: &Shared,
    host: &str,
    port: u16,
    key: &russh::keys::PublicKeyOrCertificate,
) -> bool {
    match key {
        russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
            verify_host_key(shared, host, port, key)
        }
        russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
            match verify_host_certificate(shared, host, port, cert) {
                Ok(Some(())) => true,
                // No `@cert-authority` for this host: judge the certified key as a plain
                // host key, as OpenSSH does ("No matching CA found. Retry with plain key").
                Ok(None) => {
                    tracing::debug!("No matching CA found. Retry with plain key");
                    let plain = PublicKey::new(cert.public_key().clone(), "");
                    verify_host_key(shared, host, port, &plain)
                }
                Err(msg) => {
                    tracing::error!("{msg}");
                    *lock(&shared.host_key_refusal) = Some(msg);
                    false
                }
            }
        }
    }
}

/// A host certificate: `Ok(Some(()))` when a `@cert-authority` of known_hosts for
/// `host`:`port` signed it and [`crate::cert::check_host`] accepts it, `Ok(None)` when no CA
/// line names the signer, the refusal (OpenSSH's words first) otherwise.
fn verify_host_certificate(
    shared: &Shared,
    host: &str,
    port: u16,
    cert: &russh::keys::Certificate,
) -> Result<Option<()>, String> {
    let cfg = &shared.cfg;
    let path = cfg.known_hosts.display().to_string();
    let text = match std::fs::read_to_string(&cfg.known_hosts) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {path}: {e}")),
    };
    let ca = certs::ca_blob(cert);
    let who = known_hosts::host_field(host, port);
    let Some(authority) = known_hosts::cert_authorities(&text, host, port)
        .into_iter()
        .find(|a| a.blob == ca)
    else {
        return Ok(None);
    };
    let certified = PublicKey::new(cert.public_key().clone(), "").public_key_bytes();
    for (blob, what) in [(&ca, "certificate authority"), (&certified, "key")] {
        if let Some(line) = known_hosts::revoked(&text, blob) {
            return Err(format!(
                "Host {what} for {who} is marked as revoked at {path}:{line}; refusing to connect"
            ));
        }
    }
    if let Err(e) = cert.verify_signature() {
        return Err(format!(
            "Host certificate for {who}: bad signature by its CA ({e}); refusing to connect"
        ));
    }
    let facts = certs::facts(cert);
    crate::cert::check_host(&facts, host, certs::unix_now()).map_err(|why| {
        format!(
            "{why} (host certificate {:?} for {who}, principals {:?}, CA at {path}:{})",
            facts.key_id, facts.principals, authority.line
        )
    })?;
    tracing::debug!(
        "Host certificate {:?} for {who} accepted, CA at {path}:{}",
        facts.key_id,
        authority.line
    );
    Ok(Some(()))
}

fn verify_host_key(shared: &Shared, host: &str, port: u16, key: &PublicKey) -> bool {
    let cfg = &shared.cfg;
    let path = cfg.known_hosts.display().to_string();
    let text = match std::fs::read_to_string(&cfg.known_hosts) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            *lock(&shared.host_key_refusal) = Some(format!("cannot read {path}: {e}"));
            return false;
        }
    };
    let algorithm = key.algorithm().as_str().to_string();
    let blob = key.public_key_bytes();
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let status = known_hosts::check(&text, host, port, &algorithm, &blob);
    match known_hosts::decide(
        &status,
        cfg.strict_host_key_checking,
        host,
        port,
        &path,
        &fingerprint,
    ) {
        Decision::Accept => true,
        Decision::AcceptAndRecord => {
            let line = known_hosts::format_entry(host, port, &algorithm, &blob);
            let recheck = |text: &str| {
                let status = known_hosts::check(text, host, port, &algorithm, &blob);
                known_hosts::decide(
                    &status,
                    cfg.strict_host_key_checking,
                    host,
                    port,
                    &path,
                    &fingerprint,
                )
            };
            match append_locked(&cfg.known_hosts, &line, recheck) {
                Ok(Decision::Accept) => true,
                Ok(Decision::Refuse(msg)) => {
                    tracing::error!("{msg}");
                    *lock(&shared.host_key_refusal) = Some(msg);
                    false
                }
                Ok(Decision::AcceptAndRecord) => {
                    tracing::warn!(
                        "Permanently added '{}' ({algorithm}) to the list of known hosts ({path}); fingerprint {fingerprint}",
                        known_hosts::host_field(host, port)
                    );
                    true
                }
                Err(e) => {
                    *lock(&shared.host_key_refusal) =
                        Some(format!("cannot record host key in {path}: {e}"));
                    false
                }
            }
        }
        Decision::Refuse(msg) => {
            tracing::error!("{msg}");
            *lock(&shared.host_key_refusal) = Some(msg);
            false
        }
    }
}

/// Appends `line` to known_hosts under an exclusive flock, after re-reading the file under
/// the lock and deciding again with `recheck`: another process (`vipgate ssh` beside the
/// daemon, a second `[[ssh]]` to the same host) may have recorded a key meanwhile, and then
/// that record decides (the same key is accepted, a different one refused) instead of both
/// keys ending up trusted. Returns the decision under the lock; the line was written only for
/// [`Decision::AcceptAndRecord`].
fn append_locked(
    path: &std::path::Path,
    line: &str,
    recheck: impl Fn(&str) -> Decision,
) -> std::io::Result<Decision> {
    use std::io::{Read, Write};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    f.lock()?;
    let mut existing = String::new();
    f.read_to_string(&mut existing)?;
    let decision = recheck(&existing);
    if decision == Decision::AcceptAndRecord {
        if !existing.is_empty() && !existing.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.write_all(line.as_bytes())?;
    }
    // The lock is released when `f` is closed.
    Ok(decision)
}

impl client::Handler for JumpHandler {
    type Error = SshFwdError;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(check_key(&self.shared, &self.host, self.port, key))
    }
}

impl client::Handler for ClientHandler {
    type Error = SshFwdError;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let cfg = &self.shared.cfg;
        Ok(check_key(&self.shared, &cfg.host, cfg.port, key))
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::debug!(
            "forwarded connection from {originator_address}:{originator_port} \
             to {connected_address}:{connected_port}"
        );
        let find = move |shared: &Shared| {
            shared.remotes().into_iter().find(|r| {
                matches!(r.spec.listen, Endpoint::Tcp { .. })
                    && r.listening.load(Ordering::Relaxed)
                    && r.bound_port.load(Ordering::Relaxed) == u64::from(connected_port)
            })
        };
        let asked_for = format!("{connected_address}:{connected_port}");
        self.serve_or_refuse(find, channel, reply, asked_for);
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path = socket_path.to_string();
        let asked_for = format!("socket {socket_path}");
        let find = move |shared: &Shared| {
            shared.remotes().into_iter().find(|r| {
                r.listening.load(Ordering::Relaxed)
                    && matches!(&r.spec.listen, Endpoint::Unix(p) if *p == path)
            })
        };
        self.serve_or_refuse(find, channel, reply, asked_for);
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let why = match &reason {
            client::DisconnectReason::ReceivedDisconnect(info) => {
                format!("server disconnected: {info:?}")
            }
            client::DisconnectReason::Error(e) => e.to_string(),
        };
        lock(&self.shared.state).last_error = Some(why);
        match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::known_hosts::StrictHostKeyChecking;

    /// Two first contacts racing with different keys: the second re-checks under the lock,
    /// sees the first one's record and is refused, so only one key is ever trusted.
    #[test]
    fn accept_new_rechecks_under_the_lock() {
        let dir = std::env::temp_dir().join(format!("sshfwd-kh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("known_hosts");
        let record = |blob: &[u8]| {
            let line = known_hosts::format_entry("h", 2222, "ssh-ed25519", blob);
            append_locked(&path, &line, |text| {
                let status = known_hosts::check(text, "h", 2222, "ssh-ed25519", blob);
                known_hosts::decide(
                    &status,
                    StrictHostKeyChecking::AcceptNew,
                    "h",
                    2222,
                    "known_hosts",
                    "SHA256:x",
                )
            })
            .unwrap()
        };
        assert_eq!(record(&[0, 0, 0, 1]), Decision::AcceptAndRecord);
        assert!(matches!(record(&[0, 0, 0, 2]), Decision::Refuse(_)));
        assert_eq!(record(&[0, 0, 0, 1]), Decision::Accept);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
