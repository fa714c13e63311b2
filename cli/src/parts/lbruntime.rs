//! What the operator changed in a running virtual service (`vipgate lb add-backend`,
//! `remove-backend`, `set state`), kept beside the file's configuration of the service and
//! nowhere else: a restart forgets it, and a reload that changes the service in the file
//! replaces it with the file's (a reload that leaves the service alone keeps it).
//!
//! Pure bookkeeping: [`Runtime::effective`] is the configuration the gateway runs, the file's
//! plus the changes; the lb part applies it and shows [`Runtime::diff`] in `show lb`.

use balance::{AdminState, BackendConfig};
use std::collections::BTreeMap;
use std::net::SocketAddrV4;

/// One service: the file's configuration and the runtime changes on top of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Runtime {
    /// The service as the file says (at the start or the last reload).
    file: natgw::ServiceConfig,
    /// Backends added at run time; one the file lists too replaces the file's entry (it was
    /// removed and added again with other settings).
    added: Vec<BackendConfig>,
    /// The file's backends removed at run time.
    removed: Vec<SocketAddrV4>,
    /// Operator states other than ready.
    states: BTreeMap<SocketAddrV4, AdminState>,
}

/// How one running backend differs from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct BackendDiff {
    /// Not in the file at all.
    pub(crate) added: bool,
    /// The file's weight, when the file lists the backend with another weight than the one
    /// running (an `lb weight`, or an `add-backend` of a removed file backend).
    pub(crate) file_weight: Option<u32>,
}

impl Runtime {
    /// No change yet.
    pub(crate) fn new(file: natgw::ServiceConfig) -> Self {
        Self {
            file,
            added: Vec::new(),
            removed: Vec::new(),
            states: BTreeMap::new(),
        }
    }

    /// The file's configuration of the service.
    pub(crate) fn file(&self) -> &natgw::ServiceConfig {
        &self.file
    }

    /// Whether anything differs from the file.
    pub(crate) fn is_changed(&self) -> bool {
        !(self.added.is_empty() && self.removed.is_empty() && self.states.is_empty())
    }

    /// What the gateway runs: the file's backends but those removed or replaced, then the
    /// added ones.
    pub(crate) fn effective(&self) -> natgw::ServiceConfig {
        let mut c = self.file.clone();
        c.pool.backends.retain(|b| {
            !self.removed.contains(&b.addr) && !self.added.iter().any(|a| a.addr == b.addr)
        });
        c.pool.backends.extend(self.added.iter().copied());
        c
    }

    /// Whether `addr` is a backend of the effective configuration.
    pub(crate) fn has(&self, addr: SocketAddrV4) -> bool {
        self.effective()
            .pool
            .backends
            .iter()
            .any(|b| b.addr == addr)
    }

    /// The changes with `backend` added.
    ///
    /// # Errors
    /// It is already a backend of the service.
    pub(crate) fn with_added(&self, backend: BackendConfig) -> Result<Self, String> {
        if self.has(backend.addr) {
            return Err(format!(
                "{} is already a backend of service `{}` (`vipgate lb weight` and `lb set state` change it)",
                backend.addr, self.file.name
            ));
        }
        let mut next = self.clone();
        next.removed.retain(|a| *a != backend.addr);
        let same_as_file = self.file.pool.backends.contains(&backend);
        if !same_as_file {
            next.added.push(backend);
        }
        Ok(next)
    }

    /// The changes with `addr` removed (its state forgotten).
    ///
    /// # Errors
    /// It is not a backend of the service, or the last one (the config check refuses a
    /// service without backends).
    pub(crate) fn with_removed(&self, addr: SocketAddrV4) -> Result<Self, String> {
        let name = &self.file.name;
        if !self.has(addr) {
            return Err(format!("{addr} is not a backend of service `{name}`"));
        }
        if self.effective().pool.backends.len() == 1 {
            return Err(format!(
                "{addr} is the last backend of service `{name}`, and a service needs one; `vipgate lb set state {name} {addr} maint` stops its new flows"
            ));
        }
        let mut next = self.clone();
        next.added.retain(|b| b.addr != addr);
        if self.file.pool.backends.iter().any(|b| b.addr == addr) {
            next.removed.push(addr);
        }
        next.states.remove(&addr);
        Ok(next)
    }

    /// Records a backend's operator state (the caller has applied it to the pool).
    pub(crate) fn set_state(&mut self, addr: SocketAddrV4, state: AdminState) {
        if state == AdminState::Ready {
            self.states.remove(&addr);
        } else {
            self.states.insert(addr, state);
        }
    }

    /// The operator state of a backend (ready unless set).
    pub(crate) fn state(&self, addr: SocketAddrV4) -> AdminState {
        self.states.get(&addr).copied().unwrap_or_default()
    }

    /// The file's backends removed at run time.
    pub(crate) fn removed(&self) -> &[SocketAddrV4] {
        &self.removed
    }

    /// How a running backend with `weight` differs from the file.
    pub(crate) fn diff(&self, addr: SocketAddrV4, weight: u32) -> BackendDiff {
        match self.file.pool.backends.iter().find(|b| b.addr == addr) {
            None => BackendDiff {
                added: true,
                file_weight: None,
            },
            Some(b) => BackendDiff {
                added: false,
                file_weight: (b.weight != weight).then_some(b.weight),
            },
        }
    }

    /// The state after a reload to `file`: these changes when the file's service is the
    /// same, none otherwise (the file's new configuration replaces them).
    pub(crate) fn reloaded(&self, file: natgw::ServiceConfig) -> Self {
        if self.file == file {
            self.clone()
        } else {
            Self::new(file)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn be(last: u8, weight: u32) -> BackendConfig {
        BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 80), weight)
    }

    fn file(backends: Vec<BackendConfig>) -> natgw::ServiceConfig {
        natgw::ServiceConfig {
            name: "web".into(),
            listen: "198.51.100.10:80".parse().unwrap(),
            ports: None,
            pool: balance::PoolConfig {
                backends,
                ..balance::PoolConfig::default()
            },
            health: None,
            forward: natgw::Forward::Nat,
            proto: natgw::Proto::Tcp,
            one_packet: false,
        }
    }

    fn addrs(r: &Runtime) -> Vec<u8> {
        r.effective()
            .pool
            .backends
            .iter()
            .map(|b| b.addr.ip().octets()[3])
            .collect()
    }

    #[test]
    fn adds_removes_and_states_are_a_difference_from_the_file() {
        let rt = Runtime::new(file(vec![be(1, 1), be(2, 3)]));
        assert!(!rt.is_changed());
        let err = rt.with_added(be(1, 5)).unwrap_err();
        assert!(err.contains("already a backend"), "{err}");
        let mut rt = rt.with_added(be(3, 2)).unwrap();
        assert_eq!(addrs(&rt), [1, 2, 3]);
        assert!(rt.diff(be(3, 2).addr, 2).added);
        rt = rt.with_removed(be(2, 3).addr).unwrap();
        assert_eq!(
            (addrs(&rt), rt.removed()),
            (vec![1, 3], &[be(2, 3).addr][..])
        );
        // A removed file backend added again with another weight: the file's weight shows.
        rt = rt.with_added(be(2, 7)).unwrap();
        assert_eq!(addrs(&rt), [1, 3, 2]);
        assert!(rt.removed().is_empty());
        assert_eq!(
            rt.diff(be(2, 7).addr, 7),
            BackendDiff {
                added: false,
                file_weight: Some(3)
            }
        );
        rt.set_state(be(1, 1).addr, AdminState::Drain);
        assert_eq!(rt.state(be(1, 1).addr), AdminState::Drain);
        // Removing forgets the state; the added one goes without a trace of the file.
        rt = rt.with_removed(be(1, 1).addr).unwrap();
        assert_eq!(rt.state(be(1, 1).addr), AdminState::Ready);
        rt = rt.with_removed(be(3, 2).addr).unwrap();
        assert_eq!(addrs(&rt), [2]);
        let err = rt.with_removed(be(2, 7).addr).unwrap_err();
        assert!(err.contains("last backend"), "{err}");
        assert!(rt.with_removed(be(9, 1).addr).is_err());
        // Adding back the file's own entry is no difference at all.
        let rt = Runtime::new(file(vec![be(1, 1), be(2, 3)]))
            .with_removed(be(2, 3).addr)
            .unwrap()
            .with_added(be(2, 3))
            .unwrap();
        assert!(!rt.is_changed());
    }

    #[test]
    fn a_reload_keeps_the_changes_only_while_the_file_keeps_the_service() {
        let mut rt = Runtime::new(file(vec![be(1, 1)]))
            .with_added(be(2, 1))
            .unwrap();
        rt.set_state(be(1, 1).addr, AdminState::Maint);
        let same = rt.reloaded(file(vec![be(1, 1)]));
        assert_eq!(same, rt);
        let changed = rt.reloaded(file(vec![be(1, 2)]));
        assert!(!changed.is_changed());
        assert_eq!(addrs(&changed), [1]);
    }
}
