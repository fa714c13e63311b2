//! Where log lines go: journald's native protocol, or formatted lines on stderr (or a file).
//!
//! systemd connects a unit's stderr to the journal and says so in `JOURNAL_STREAM`
//! (`DEVICE:INODE` of that stream). When that names our stderr, text logs are sent to
//! journald natively instead: every event is one entry with `PRIORITY` from its level
//! (ERROR 3, WARN 4, INFO 6, DEBUG and TRACE 7), `SYSLOG_IDENTIFIER=vipgate`, `MESSAGE`, and
//! each tracing field as a journal field `VIPGATE_<NAME>` (so `journalctl -p warning` and
//! `journalctl VIPGATE_INSTANCE=vip-web` work). The prefix keeps a field called `priority`
//! from overwriting the entry's `PRIORITY`. `--log-format json` always stays on stderr, as
//! asked, and so does a `vipgate ssh -E` log file.
//!
//! Formatted lines carry ANSI colour only when they go to a terminal and `NO_COLOR` is unset.

use crate::args::LogFormat;
use std::io::IsTerminal as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The journal's `SYSLOG_IDENTIFIER` (`journalctl -t vipgate`), whatever the binary is called.
pub(crate) const SYSLOG_IDENTIFIER: &str = "vipgate";

/// Prefix of tracing fields as journal fields (`instance` becomes `VIPGATE_INSTANCE`).
const JOURNAL_FIELD_PREFIX: &str = "VIPGATE";

/// Installs the global subscriber: the level comes from `RUST_LOG`, else `quiet` (errors
/// only) or `verbose` (-v debug, -vv trace), else info.
///
/// # Errors
/// `log_file` cannot be opened for appending.
pub(crate) fn init(
    format: LogFormat,
    verbose: u8,
    quiet: bool,
    log_file: Option<&Path>,
) -> anyhow::Result<()> {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if format == LogFormat::Text && log_file.is_none() && stderr_is_journal() {
        // journald may be gone (a unit's stderr outlives it); then plain lines on stderr.
        if let Ok(journal) = tracing_journald::layer() {
            // syslog's meanings: INFO is informational (6), not notice (the crate's default).
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            let journal = journal
                .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
                .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_owned()))
                .with_priority_mappings(priorities);
            tracing_subscriber::registry()
                .with(filter)
                .with(journal)
                .init();
            return Ok(());
        }
    }
    let (writer, ansi) = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stderr),
            colour_wanted(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Whether `JOURNAL_STREAM` names the file stderr is open on.
fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fstat(2) through /proc: no unsafe, and the link resolves to the open file itself.
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    var.to_str()
        .is_some_and(|v| journal_stream_names(v, meta.dev(), meta.ino()))
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`, both decimal) names `(dev, ino)`.
fn journal_stream_names(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// Colour codes only for a terminal, and never with `NO_COLOR` set to anything non-empty
/// (no-color.org).
fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn journal_stream_must_name_exactly_our_stderr() {
        assert!(journal_stream_names("64769:123456", 64769, 123_456));
        assert!(!journal_stream_names("64769:123457", 64769, 123_456));
        assert!(!journal_stream_names("1:123456", 64769, 123_456));
        for malformed in [
            "",
            "64769",
            "64769:",
            ":123456",
            "a:b",
            "64769:123456:1",
            " 1:2",
        ] {
            assert!(
                !journal_stream_names(malformed, 64769, 123_456),
                "{malformed:?}"
            );
            assert!(!journal_stream_names(malformed, 1, 2), "{malformed:?}");
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(
            !colour_wanted(false, None),
            "a pipe or a file gets no escapes"
        );
    }
}
