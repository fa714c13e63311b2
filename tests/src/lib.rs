//! Harness for vipgate's end-to-end tests: real network namespaces, real peers.
//!
//! Every test starts with `let t = e2e!();` ([`e2e!`]): a fresh [`Topology`] named after the
//! test function. Its namespaces carry a prefix unique to the test and process, and it tears
//! everything down in `Drop` — after a panic too — so no namespace, process or file outlives
//! the test. Nothing is ever configured in the root namespace: veth pairs are created directly
//! inside the namespaces. The lab scripts' namespaces are removed by a [`LabGuard`].
//!
//! Tests ask the daemon through [`Topology::show`] (parsed `show --json`) and read numbers with
//! [`counter`]; they never search JSON text. Waits poll with a deadline ([`wait_until`],
//! [`wait_for`], [`Topology::wait_tcp`], [`Topology::wait_listening`]); there are no bare
//! sleeps. These tests need root; without it they fail with a clear message (they never skip).

pub mod spoof;

use serde_json::Value;
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh [`Topology`] named after the test function that invokes it (ripgrep's `rgtest!`
/// idea without wrapping the body): `let t = e2e!();` at the top of a `#[test] fn`, so the
/// namespaces and the directory of a failed test say which test made them.
#[macro_export]
macro_rules! e2e {
    () => {{
        fn here() {}
        $crate::Topology::new($crate::test_name(::std::any::type_name_of_val(&here)))
    }};
}

/// The test function's name in the type path of a fn item declared inside it
/// (`e2e::nat::static_forwards::here` gives `static_forwards`).
#[doc(hidden)]
pub fn test_name(type_path: &str) -> &str {
    type_path
        .rsplit("::")
        .find(|segment| *segment != "here" && *segment != "{{closure}}")
        .unwrap_or(type_path)
}

/// What to ask a running daemon with `vipgate show KIND --json` (or `status --json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// `vipgate status --json`: every part with its kind and status.
    Status,
    /// `vipgate show gre --json`.
    Gre,
    /// `vipgate show nat --json`.
    Nat,
    /// `vipgate show lb --json`.
    Lb,
    /// `vipgate show http --json`.
    Http,
    /// `vipgate show vrrp --json`.
    Vrrp,
    /// `vipgate show sync --json`.
    Sync,
    /// `vipgate show ssh --json`.
    Ssh,
}

impl Show {
    fn args(self) -> &'static [&'static str] {
        match self {
            Show::Status => &["status"],
            Show::Gre => &["show", "gre"],
            Show::Nat => &["show", "nat"],
            Show::Lb => &["show", "lb"],
            Show::Http => &["show", "http"],
            Show::Vrrp => &["show", "vrrp"],
            Show::Sync => &["show", "sync"],
            Show::Ssh => &["show", "ssh"],
        }
    }
}

/// The number at `path` in `v` (object keys, or array indices written as numbers).
///
/// # Panics
/// When the path does not lead to an unsigned integer: a renamed or missing counter fails the
/// test instead of reading as zero.
pub fn counter(v: &Value, path: &[&str]) -> u64 {
    field(v, path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no counter at {path:?} in {v}"))
}

/// The value at `path` in `v` (object keys, or array indices written as numbers), if any.
pub fn field<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(v, |v, key| match v {
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => v.get(*key),
    })
}

/// Fails the test unless it runs as root (namespaces, TUN and raw sockets need it).
///
/// # Panics
/// When not root: these tests must fail loudly in CI rather than skip.
pub fn require_root() {
    assert_eq!(
        euid(),
        0,
        "vipgate end-to-end tests need root (network namespaces, TUN, raw sockets): run them with sudo or as root"
    );
}

fn euid() -> u32 {
    // /proc/self/status has the effective uid as the second field of "Uid:".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// Path of the `vipgate` binary under test: `$VIPGATE_BIN`, else the workspace's debug build.
///
/// # Panics
/// When the binary has not been built.
pub fn vipgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VIPGATE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let bin = target.join("debug/vipgate");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p vipgate` (the test script does)",
        bin.display()
    );
    bin
}

/// The repository root (for netns-scripts/ and examples/).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Polls `probe` every 20 ms until it returns true.
///
/// # Panics
/// When `timeout` passes first; the message names `what`.
pub fn wait_until(timeout: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    wait_for(timeout, what, || probe().then_some(()));
}

/// Polls `probe` every 20 ms until it returns `Some`, and returns the value.
///
/// # Panics
/// When `timeout` passes first; the message names `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process started by a test; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends a signal (e.g. `libc::SIGHUP`).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `timeout` for a clean exit; returns the exit code if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit by itself and returns its exit code.
    ///
    /// # Panics
    /// When it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let name = self.name.clone();
        let child = self.child.as_mut()?;
        let status = wait_for(timeout, &format!("{name} to exit"), || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// A test's private set of network namespaces, files and processes.
pub struct Topology {
    prefix: String,
    hosts: Vec<String>,
    dir: PathBuf,
    _machine: MachineShare,
}

impl Topology {
    /// A fresh topology for the test `test_name` (namespaces `PREFIX-host`).
    ///
    /// # Panics
    /// When not root.
    pub fn new(test_name: &str) -> Self {
        require_root();
        let mut h = DefaultHasher::new();
        (
            test_name,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        )
            .hash(&mut h);
        let prefix = format!("vt{:05x}", h.finish() & 0xfffff);
        let dir = std::env::temp_dir().join(format!("vipgate-test-{prefix}-{test_name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test's directory");
        Topology {
            prefix,
            hosts: Vec::new(),
            dir,
            _machine: MachineShare::shared(),
        }
    }

    /// The namespace prefix, unique to this test run.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The test's private directory (configs, keys, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full namespace name of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Creates a host (namespace with loopback up).
    pub fn host(&mut self, host: &str) -> &mut Self {
        let ns = self.ns(host);
        run(Command::new("ip").args(["netns", "add", &ns]));
        self.hosts.push(host.to_string());
        self.ip(host, "link set lo up");
        self
    }

    /// Creates several hosts.
    pub fn hosts(&mut self, hosts: &[&str]) -> &mut Self {
        for h in hosts {
            self.host(h);
        }
        self
    }

    /// A veth pair between two hosts, created inside their namespaces, both ends up.
    pub fn veth(&mut self, a: &str, if_a: &str, b: &str, if_b: &str) -> &mut Self {
        let (ns_a, ns_b) = (self.ns(a), self.ns(b));
        run(Command::new("ip").args([
            "-n", &ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", &ns_b,
        ]));
        self.ip(a, &format!("link set {if_a} up"));
        self.ip(b, &format!("link set {if_b} up"));
        self
    }

    /// An L2 bridge on `host`.
    pub fn bridge(&mut self, host: &str, name: &str) -> &mut Self {
        self.ip(host, &format!("link add {name} type bridge"));
        self.ip(host, &format!("link set {name} up"));
        self
    }

    /// Adds `cidr` to `iface` on `host`.
    pub fn addr(&mut self, host: &str, iface: &str, cidr: &str) -> &mut Self {
        self.ip(host, &format!("addr add {cidr} dev {iface}"));
        self
    }

    /// Runs `ip ARGS` in `host`'s namespace.
    ///
    /// # Panics
    /// When the command fails.
    pub fn ip(&self, host: &str, args: &str) -> String {
        let ns = self.ns(host);
        let out = run(Command::new("ip")
            .arg("-n")
            .arg(&ns)
            .args(args.split_whitespace()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes `host` a router.
    pub fn forwarding(&mut self, host: &str) -> &mut Self {
        self.sh(host, "sysctl -qw net.ipv4.ip_forward=1");
        self
    }

    /// Runs a shell command in `host`'s namespace and returns stdout.
    ///
    /// # Panics
    /// When the command exits non-zero (stderr in the message).
    pub fn sh(&self, host: &str, cmd: &str) -> String {
        match self.try_sh(host, cmd) {
            Ok(out) => out,
            Err(e) => panic!("in {host}: `{cmd}` failed: {e}"),
        }
    }

    /// Runs a shell command in `host`'s namespace.
    ///
    /// # Errors
    /// The exit status and stderr when it fails.
    pub fn try_sh(&self, host: &str, cmd: &str) -> Result<String, String> {
        sh_in(&self.ns(host), cmd)
    }

    /// Starts `argv` in `host`'s namespace with stdout+stderr in `<dir>/<name>.log`.
    ///
    /// # Panics
    /// When the program cannot be started.
    pub fn spawn(&self, host: &str, name: &str, argv: &[&str]) -> Proc {
        let log = self.dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).expect("creating a log file");
        let err = file.try_clone().expect("cloning the log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {argv:?} in {host}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// Starts `vipgate ARGS` in `host`'s namespace.
    pub fn vipgate(&self, host: &str, name: &str, args: &[&str]) -> Proc {
        let bin = vipgate_bin();
        let mut argv = vec![bin.to_str().unwrap_or("vipgate")];
        argv.extend_from_slice(args);
        self.spawn(host, name, &argv)
    }

    /// Runs `vipgate ARGS` in `host`'s namespace to completion.
    pub fn vipgate_output(&self, host: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(vipgate_bin())
            .args(args)
            .output()
            .expect("running vipgate")
    }

    /// Writes a file into the test's directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, contents).expect("writing a test file");
        p
    }

    /// A real HTTP server (python3 http.server) on `addr:port` answering GET / with `body`.
    pub fn http_server(&self, host: &str, addr: &str, port: u16, body: &str) -> Proc {
        let www = self.dir.join(format!("www-{host}-{port}"));
        fs::create_dir_all(&www).expect("creating web root");
        fs::write(www.join("index.html"), format!("{body}\n")).expect("writing index.html");
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let p = self.spawn(
            host,
            &format!("http-{host}-{port}"),
            &[
                python,
                "-m",
                "http.server",
                "--bind",
                addr,
                "--directory",
                www.to_str().unwrap_or("."),
                &port.to_string(),
            ],
        );
        // Generous: python starts slowly on a loaded 2-core machine.
        self.wait_tcp(host, addr, port, Duration::from_secs(30));
        p
    }

    /// Waits until `addr:port` accepts TCP connections from inside `host`.
    pub fn wait_tcp(&self, host: &str, addr: &str, port: u16, timeout: Duration) {
        wait_until(
            timeout,
            &format!("{addr}:{port} to accept in {host}"),
            || {
                self.try_sh(host, &format!("bash -c 'exec 3<>/dev/tcp/{addr}/{port}'"))
                    .is_ok()
            },
        );
    }

    /// Waits until something listens on TCP `port` in `host`, without connecting to it (a
    /// server that accepts exactly one connection stays untouched).
    pub fn wait_listening(&self, host: &str, port: u16) {
        wait_until(
            Duration::from_secs(30),
            &format!("a listener on {port} in {host}"),
            || {
                self.try_sh(host, &format!("ss -Htln 'sport = :{port}'"))
                    .is_ok_and(|out| !out.trim().is_empty())
            },
        );
    }

    /// `vipgate show KIND --json` (or `status --json`) in `host` against the control socket
    /// `ctl`, parsed; `None` while the daemon does not answer or answers something else.
    pub fn try_show(&self, host: &str, ctl: impl AsRef<Path>, kind: Show) -> Option<Value> {
        let out = self.vipgate_show(host, ctl.as_ref(), kind);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `vipgate show KIND --json` (or `status --json`) in `host` against the control socket
    /// `ctl`, parsed.
    ///
    /// # Panics
    /// When the command fails or prints no JSON (its stderr in the message).
    pub fn show(&self, host: &str, ctl: impl AsRef<Path>, kind: Show) -> Value {
        let out = self.vipgate_show(host, ctl.as_ref(), kind);
        assert!(
            out.status.success(),
            "{kind:?} in {host} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{kind:?} in {host} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn vipgate_show(&self, host: &str, ctl: &Path, kind: Show) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(vipgate_bin())
            .args(kind.args())
            .arg("--json")
            .arg("--control")
            .arg(ctl)
            .output()
            .expect("running vipgate")
    }

    /// `curl` from `host`: the body, or the error.
    ///
    /// # Errors
    /// curl's exit status and message.
    pub fn curl(&self, host: &str, url: &str) -> Result<String, String> {
        self.try_sh(host, &format!("curl -sS --max-time 5 '{url}'"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for host in self.hosts.iter().rev() {
            let ns = self.ns(host);
            // Processes started inside the namespace by anything (daemons that fork) go too.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A lab started with `vipgate lab up --prefix PREFIX` (its namespaces are `PREFIX-host`),
/// torn down with `vipgate lab down` when dropped, even if an assertion fails halfway.
///
/// The lab's test looks at the whole machine's namespace list, so a `LabGuard` has the machine
/// alone: it waits for running topologies to go and holds new ones back until it is dropped.
pub struct LabGuard {
    prefix: String,
    _machine: MachineShare,
}

impl LabGuard {
    /// Guards the lab of `prefix` (bring it up with [`LabGuard::lab`]).
    ///
    /// # Panics
    /// When not root.
    pub fn new(prefix: &str) -> Self {
        require_root();
        LabGuard {
            prefix: prefix.to_string(),
            _machine: MachineShare::alone(),
        }
    }

    /// Runs `vipgate lab SUBCOMMAND --prefix PREFIX` to completion.
    pub fn lab(&self, subcommand: &str) -> Output {
        lab(&[subcommand, "--prefix", &self.prefix])
    }

    /// Runs a shell command in the lab's `host`.
    ///
    /// # Errors
    /// The exit status and stderr when it fails.
    pub fn try_sh(&self, host: &str, cmd: &str) -> Result<String, String> {
        sh_in(&format!("{}-{host}", self.prefix), cmd)
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = self.lab("down");
    }
}

/// Who uses the machine's network namespaces now: how many topologies, and whether a lab
/// test has it alone.
struct MachineUse {
    topologies: usize,
    alone: bool,
}

static MACHINE: Mutex<MachineUse> = Mutex::new(MachineUse {
    topologies: 0,
    alone: false,
});
static MACHINE_CHANGED: Condvar = Condvar::new();

/// A share of the machine, given back when dropped: shared by topologies, or alone.
struct MachineShare {
    alone: bool,
}

impl MachineShare {
    fn shared() -> Self {
        let mut m = lock_machine();
        while m.alone {
            m = MACHINE_CHANGED
                .wait(m)
                .unwrap_or_else(PoisonError::into_inner);
        }
        m.topologies += 1;
        MachineShare { alone: false }
    }

    fn alone() -> Self {
        let mut m = lock_machine();
        while m.alone || m.topologies > 0 {
            m = MACHINE_CHANGED
                .wait(m)
                .unwrap_or_else(PoisonError::into_inner);
        }
        m.alone = true;
        MachineShare { alone: true }
    }
}

impl Drop for MachineShare {
    fn drop(&mut self) {
        let mut m = lock_machine();
        if self.alone {
            m.alone = false;
        } else {
            m.topologies -= 1;
        }
        MACHINE_CHANGED.notify_all();
    }
}

/// A test that panicked while holding the lock left the counts consistent (each change is
/// one statement), so a poisoned lock is used as is.
fn lock_machine() -> MutexGuard<'static, MachineUse> {
    MACHINE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `vipgate lab ARGS` to completion.
pub fn lab(args: &[&str]) -> Output {
    Command::new(vipgate_bin())
        .arg("lab")
        .args(args)
        .output()
        .expect("running vipgate lab")
}

/// The names of the network namespaces on this machine, sorted.
pub fn netns_list() -> Vec<String> {
    let out = run(Command::new("ip").args(["netns", "list"]));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    names.sort();
    names
}

fn sh_in(ns: &str, cmd: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_name_is_the_enclosing_function() {
        fn here() {}
        assert_eq!(
            test_name(std::any::type_name_of_val(&here)),
            "test_name_is_the_enclosing_function"
        );
        assert_eq!(
            test_name("e2e::nat::static_forwards::here"),
            "static_forwards"
        );
    }

    #[test]
    fn counter_follows_keys_and_indices() {
        let v: Value = serde_json::json!([{"counters": {"rx": 7}, "drops": {"bad": 0}}]);
        assert_eq!(counter(&v, &["0", "counters", "rx"]), 7);
        assert_eq!(counter(&v, &["0", "drops", "bad"]), 0);
        assert_eq!(field(&v, &["0", "missing"]), None);
        assert_eq!(field(&v, &["1"]), None);
    }

    #[test]
    #[should_panic(expected = "no counter at [\"0\", \"renamed\"]")]
    fn a_missing_counter_fails() {
        counter(&serde_json::json!([{}]), &["0", "renamed"]);
    }
}
