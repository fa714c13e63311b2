//! Process-wide privilege reduction for `vipgate run` and `vipgate sshd`.
//!
//! Invariant: [`reduce`] runs on the main thread while it is the process's only thread
//! (before the tokio runtime, the VRRP reader threads or the sshfwd workers exist). Linux
//! capabilities, the bounding set, securebits and no_new_privs are per task and inherited
//! by every thread and child created afterwards, so reducing the only thread reduces the
//! whole process. Every task then holds exactly [`KEEP`] in its permitted, effective,
//! inheritable, bounding and ambient sets and has no_new_privs set: CAP_NET_ADMIN
//! (routes, addresses, TUN, writes under /proc/sys/net), CAP_NET_RAW (raw and packet
//! sockets), CAP_NET_BIND_SERVICE (ports below 1024), plus CAP_BPF when the NAT gateway
//! runs its kernel fast path (loading the TC program and its maps; bpffs is mounted before
//! the drop). Programs the daemon runs (VRRP notify scripts) get the same set through the
//! ambient set and no more.
//!
//! Optionally (`[daemon] user`, `group`) the process switches to an unprivileged uid and
//! gid, keeping [`KEEP`] across the switch (PR_SET_KEEPCAPS), so root-owned files are no
//! longer writable by owner either.
//!
//! What no longer works after the drop: reading or writing files the daemon's uid does not
//! own by permission bits alone (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH are gone), e.g.
//! another user's 0600 authorized_keys or identity; with `user`, writing root-owned paths
//! (host key generation, the control socket directory) unless they belong to that user.

use anyhow::Context;
use caps::{CapSet, Capability};
use std::collections::HashSet;

/// The capabilities the daemon keeps.
pub(crate) const KEEP: [Capability; 3] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_NET_BIND_SERVICE,
];

/// Whom to become, resolved from `[daemon] user` / `group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) uid: nix::unistd::Uid,
    pub(crate) gid: nix::unistd::Gid,
}

/// Looks up `user` (and `group`, else the user's primary group) in the system databases.
///
/// # Errors
/// No such user or group.
pub(crate) fn resolve(user: &str, group: Option<&str>) -> anyhow::Result<Identity> {
    let u = nix::unistd::User::from_name(user)
        .with_context(|| format!("looking up user {user:?}"))?
        .ok_or_else(|| anyhow::anyhow!("no such user {user:?}"))?;
    let gid = match group {
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .with_context(|| format!("looking up group {g:?}"))?
                .ok_or_else(|| anyhow::anyhow!("no such group {g:?}"))?
                .gid
        }
        None => u.gid,
    };
    Ok(Identity { uid: u.uid, gid })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every connection, probe and tunnel is
/// a descriptor, and the common soft default of 1024 is far below what the caps allow.
pub(crate) fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// Reduces the whole process to [`KEEP`] (optionally as `identity`) and sets no_new_privs.
///
/// Must be called while the calling thread is the only one (see the module invariant); it
/// checks /proc/self/task and refuses otherwise, since a drop that misses threads would be
/// a lie.
///
/// # Errors
/// More than one thread, or the kernel refused a change (the daemon then does not start:
/// it promised to run reduced).
pub(crate) fn reduce(identity: Option<Identity>, extra: &[Capability]) -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        anyhow::bail!("internal: privileges reduced with {threads} threads running");
    }
    let keep: HashSet<Capability> = KEEP.into_iter().chain(extra.iter().copied()).collect();
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| anyhow::anyhow!("dropping {cap} from the bounding set: {e}"))?;
        }
    }
    // A daemon re-exec'd by `vipgate restart` already is `identity`, and no longer holds the
    // capabilities a switch needs (CAP_SETUID, CAP_SETGID).
    let switched = identity.is_some_and(|id| {
        nix::unistd::getuid() == id.uid
            && nix::unistd::geteuid() == id.uid
            && nix::unistd::getgid() == id.gid
            && nix::unistd::getegid() == id.gid
            && nix::unistd::getgroups().is_ok_and(|g| g == [id.gid])
    });
    if let Some(id) = identity.filter(|_| !switched) {
        // Keep the permitted set across setuid; effective is cleared and re-raised below.
        nix::sys::prctl::set_keepcaps(true)
            .map_err(|e| anyhow::anyhow!("setting PR_SET_KEEPCAPS: {e}"))?;
        nix::unistd::setgroups(&[id.gid])
            .map_err(|e| anyhow::anyhow!("setting supplementary groups: {e}"))?;
        nix::unistd::setresgid(id.gid, id.gid, id.gid)
            .map_err(|e| anyhow::anyhow!("switching to gid {}: {e}", id.gid))?;
        nix::unistd::setresuid(id.uid, id.uid, id.uid)
            .map_err(|e| anyhow::anyhow!("switching to uid {}: {e}", id.uid))?;
    }
    let current = caps::read(None, CapSet::Permitted)
        .map_err(|e| anyhow::anyhow!("reading capabilities: {e}"))?;
    let kept: HashSet<Capability> = current.intersection(&keep).copied().collect();
    if kept.len() != keep.len() {
        let missing: Vec<_> = keep.difference(&kept).collect();
        anyhow::bail!("the daemon needs {missing:?}, which this process does not hold");
    }
    caps::set(None, CapSet::Inheritable, &kept)
        .map_err(|e| anyhow::anyhow!("setting inheritable capabilities: {e}"))?;
    caps::set(None, CapSet::Effective, &kept)
        .map_err(|e| anyhow::anyhow!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &kept)
        .map_err(|e| anyhow::anyhow!("setting permitted capabilities: {e}"))?;
    for cap in &kept {
        caps::raise(None, CapSet::Ambient, *cap)
            .map_err(|e| anyhow::anyhow!("raising ambient {cap}: {e}"))?;
    }
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| anyhow::anyhow!("setting no_new_privs: {e}"))?;
    tracing::info!(
        kept = ?kept,
        uid = %nix::unistd::getuid(),
        gid = %nix::unistd::getgid(),
        "every thread keeps only these capabilities (no_new_privs set)"
    );
    Ok(())
}
