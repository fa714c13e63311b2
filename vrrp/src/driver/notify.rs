//! keepalived's notify family: what runs on a state change, and how.
//!
//! On a transition to `STATE` of an instance (or, for a sync group, of the whole group) the
//! state's own script runs first (`notify_master`, `notify_backup`, `notify_fault`,
//! `notify_stop`), as configured, then `notify` with four arguments appended, exactly as
//! keepalived calls it: `INSTANCE|GROUP NAME MASTER|BACKUP|FAULT|STOP PRIORITY` (a group's
//! priority is 0, and only instances report STOP, when the daemon stops them). So a script
//! written for keepalived runs unchanged.
//!
//! Every program is started with stdin and stdout on /dev/null, in its own process group,
//! with an environment of exactly [`NOTIFY_PATH`] as `PATH` plus `VIPGATE_TYPE`,
//! `VIPGATE_NAME` (and `VIPGATE_INSTANCE` for instances), `VIPGATE_STATE` and
//! `VIPGATE_PRIORITY`; the group is killed when it runs past the timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::instance::State;

/// The `PATH` a notify program gets (its own path must be absolute).
pub const NOTIFY_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A program and the arguments written after it, as keepalived takes a script:
/// `"/etc/keepalived/notify.sh --site hq"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCommand {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Arguments given in the config, before any that vipgate appends.
    pub args: Vec<String>,
}

impl ScriptCommand {
    /// Splits `line` at whitespace (no quoting, as keepalived without quotes): the program,
    /// then its arguments. `None` when the line is empty.
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let program = PathBuf::from(words.next()?);
        Some(Self {
            program,
            args: words.map(str::to_owned).collect(),
        })
    }
}

impl std::fmt::Display for ScriptCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// The notify scripts of one instance or sync group (keepalived's names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyScripts {
    /// Every transition, with `TYPE NAME STATE PRIORITY` appended, after the state's own script.
    pub notify: Option<ScriptCommand>,
    /// Becoming master.
    pub master: Option<ScriptCommand>,
    /// Becoming backup.
    pub backup: Option<ScriptCommand>,
    /// Entering fault.
    pub fault: Option<ScriptCommand>,
    /// Stopped by the daemon (instances only).
    pub stop: Option<ScriptCommand>,
}

impl NotifyScripts {
    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.notify.is_none()
            && self.master.is_none()
            && self.backup.is_none()
            && self.fault.is_none()
            && self.stop.is_none()
    }

    /// What runs, in order, for `event`: the state's own script, then `notify`.
    pub(crate) fn invocations(&self, event: &NotifyEvent) -> Vec<Invocation> {
        let own = match event.state {
            NotifyState::Master => &self.master,
            NotifyState::Backup => &self.backup,
            NotifyState::Fault => &self.fault,
            NotifyState::Stop => &self.stop,
        };
        let mut out = Vec::new();
        if let Some(c) = own {
            out.push(Invocation {
                command: c.clone(),
                appended: Vec::new(),
                env: event.env(),
            });
        }
        if let Some(c) = &self.notify {
            out.push(Invocation {
                command: c.clone(),
                appended: event.arguments(),
                env: event.env(),
            });
        }
        out
    }
}

/// Whose state changed: keepalived's first `notify` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifyScope {
    Instance,
    Group,
}

/// The state reported to scripts: keepalived's names, where the daemon stopping an
/// instance (its INIT) is `STOP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifyState {
    Master,
    Backup,
    Fault,
    Stop,
}

impl NotifyState {
    pub(crate) fn from_state(state: State) -> Self {
        match state {
            State::Master => Self::Master,
            State::Backup => Self::Backup,
            State::Fault => Self::Fault,
            State::Initialize => Self::Stop,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Master => "MASTER",
            Self::Backup => "BACKUP",
            Self::Fault => "FAULT",
            Self::Stop => "STOP",
        }
    }
}

/// One state change to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotifyEvent {
    pub(crate) scope: NotifyScope,
    pub(crate) name: String,
    pub(crate) state: NotifyState,
    /// The instance's priority after the change; 0 for a group.
    pub(crate) priority: u8,
}

impl NotifyEvent {
    /// keepalived's `notify` arguments: `TYPE NAME STATE PRIORITY`.
    fn arguments(&self) -> Vec<String> {
        let scope = match self.scope {
            NotifyScope::Instance => "INSTANCE",
            NotifyScope::Group => "GROUP",
        };
        vec![
            scope.to_owned(),
            self.name.clone(),
            self.state.as_str().to_owned(),
            self.priority.to_string(),
        ]
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let [scope, name, state, priority] = <[String; 4]>::try_from(self.arguments())
            .unwrap_or_else(|_| unreachable!("arguments() returns four words"));
        let mut env = vec![
            ("PATH", NOTIFY_PATH.to_owned()),
            ("VIPGATE_TYPE", scope),
            ("VIPGATE_NAME", name.clone()),
            ("VIPGATE_STATE", state),
            ("VIPGATE_PRIORITY", priority),
        ];
        if self.scope == NotifyScope::Instance {
            env.push(("VIPGATE_INSTANCE", name));
        }
        env
    }
}

/// One program to start: the configured command, the arguments vipgate appends, and the
/// whole environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invocation {
    pub(crate) command: ScriptCommand,
    pub(crate) appended: Vec<String>,
    pub(crate) env: Vec<(&'static str, String)>,
}

/// How one program run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifyOutcome {
    Ok,
    Failed,
    TimedOut,
}

/// Runs a track script once: whether it exited 0 within `timeout` (its process group is
/// killed otherwise). It gets only `PATH`, and stdin and stdout on /dev/null.
pub(crate) async fn run_check(command: &ScriptCommand, timeout: Duration) -> bool {
    let inv = Invocation {
        command: command.clone(),
        appended: Vec::new(),
        env: vec![("PATH", NOTIFY_PATH.to_owned())],
    };
    // A failing check is the news it reports, not a problem of the daemon: no warning.
    run_one(&inv, timeout, false).await == NotifyOutcome::Ok
}

/// Runs `invocations` one after the other, each to its end or `timeout` (then its process
/// group is killed), and reports how each ended.
pub(crate) async fn run_all(invocations: Vec<Invocation>, timeout: Duration) -> Vec<NotifyOutcome> {
    let mut outcomes = Vec::with_capacity(invocations.len());
    for inv in invocations {
        outcomes.push(run_one(&inv, timeout, true).await);
    }
    outcomes
}

/// Runs one program; `warn` logs a failed start, a failure exit or a timeout as a warning
/// (else at debug level).
async fn run_one(inv: &Invocation, timeout: Duration, warn: bool) -> NotifyOutcome {
    let program: &Path = &inv.command.program;
    let child = tokio::process::Command::new(program)
        .args(&inv.command.args)
        .args(&inv.appended)
        .env_clear()
        .envs(inv.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(program = %program.display(), error = %e, "script failed to start");
            return NotifyOutcome::Failed;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => NotifyOutcome::Ok,
        Ok(Ok(status)) => {
            if warn {
                tracing::warn!(program = %program.display(), %status, "script exited unsuccessfully");
            } else {
                tracing::debug!(program = %program.display(), %status, "script exited unsuccessfully");
            }
            NotifyOutcome::Failed
        }
        Ok(Err(e)) => {
            tracing::warn!(program = %program.display(), error = %e, "script wait failed");
            NotifyOutcome::Failed
        }
        Err(_) => {
            if warn {
                tracing::warn!(program = %program.display(), ?timeout, "script timed out; killed");
            } else {
                tracing::debug!(program = %program.display(), ?timeout, "script timed out; killed");
            }
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            NotifyOutcome::TimedOut
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn script(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vrrp-notify-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn command(program: &Path, args: &[&str]) -> ScriptCommand {
        ScriptCommand {
            program: program.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn event(scope: NotifyScope, state: NotifyState, priority: u8) -> NotifyEvent {
        NotifyEvent {
            scope,
            name: "vip".into(),
            state,
            priority,
        }
    }

    #[test]
    fn commands_split_at_whitespace_like_keepalived_scripts() {
        let c = ScriptCommand::parse("  /etc/keepalived/notify.sh  --site hq ").unwrap();
        assert_eq!(c.program, Path::new("/etc/keepalived/notify.sh"));
        assert_eq!(c.args, ["--site", "hq"]);
        assert_eq!(c.to_string(), "/etc/keepalived/notify.sh --site hq");
        assert_eq!(ScriptCommand::parse(" \t"), None);
    }

    #[test]
    fn the_state_script_runs_before_notify_which_gets_keepalived_arguments() {
        let scripts = NotifyScripts {
            notify: Some(command(Path::new("/n"), &["x"])),
            master: Some(command(Path::new("/m"), &[])),
            stop: Some(command(Path::new("/s"), &[])),
            ..NotifyScripts::default()
        };
        let runs = scripts.invocations(&event(NotifyScope::Instance, NotifyState::Master, 150));
        let programs: Vec<_> = runs.iter().map(|r| r.command.program.clone()).collect();
        assert_eq!(programs, [PathBuf::from("/m"), PathBuf::from("/n")]);
        assert!(
            runs[0].appended.is_empty(),
            "notify_master gets no arguments"
        );
        assert_eq!(runs[1].appended, ["INSTANCE", "vip", "MASTER", "150"]);
        // No notify_backup: only notify.
        let runs = scripts.invocations(&event(NotifyScope::Group, NotifyState::Backup, 0));
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].appended, ["GROUP", "vip", "BACKUP", "0"]);
        let runs = scripts.invocations(&event(NotifyScope::Instance, NotifyState::Stop, 100));
        assert_eq!(runs[0].command.program, Path::new("/s"));
        assert_eq!(runs[1].appended, ["INSTANCE", "vip", "STOP", "100"]);
        assert_eq!(
            NotifyState::from_state(State::Initialize),
            NotifyState::Stop
        );
        assert!(NotifyScripts::default().is_empty());
    }

    #[tokio::test]
    async fn notify_runs_with_a_minimal_environment_and_is_killed_after_its_timeout() {
        let out = std::env::temp_dir().join(format!("vrrp-notify-{}-env.out", std::process::id()));
        let prog = script(
            "env",
            &format!("env > {}; echo \"$@\" >> {}", out.display(), out.display()),
        );
        let scripts = NotifyScripts {
            notify: Some(command(&prog, &["--site", "hq"])),
            ..NotifyScripts::default()
        };
        let runs = scripts.invocations(&event(NotifyScope::Instance, NotifyState::Master, 150));
        let outcomes = run_all(runs, Duration::from_secs(10)).await;
        assert_eq!(outcomes, [NotifyOutcome::Ok]);
        let text = std::fs::read_to_string(&out).expect("notify output");
        let mut vars: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| *k != "PWD" && *k != "SHLVL" && *k != "_" && *k != "OLDPWD")
            .collect();
        vars.sort_unstable();
        assert_eq!(
            vars,
            [
                "PATH",
                "VIPGATE_INSTANCE",
                "VIPGATE_NAME",
                "VIPGATE_PRIORITY",
                "VIPGATE_STATE",
                "VIPGATE_TYPE"
            ],
            "{text}"
        );
        assert!(text.contains(&format!("PATH={NOTIFY_PATH}\n")), "{text}");
        assert!(
            text.ends_with("--site hq INSTANCE vip MASTER 150\n"),
            "{text}"
        );

        let slow = ScriptCommand {
            program: script("slow", "sleep 30"),
            args: Vec::new(),
        };
        let missing = command(Path::new("/nonexistent/notify"), &[]);
        let scripts = NotifyScripts {
            fault: Some(slow),
            notify: Some(missing),
            ..NotifyScripts::default()
        };
        let started = tokio::time::Instant::now();
        let runs = scripts.invocations(&event(NotifyScope::Instance, NotifyState::Fault, 1));
        let outcomes = run_all(runs, Duration::from_millis(200)).await;
        assert_eq!(outcomes, [NotifyOutcome::TimedOut, NotifyOutcome::Failed]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
