//! The site config: one TOML file describing everything a vipgate host runs.
//!
//! Loading happens in stages (ripgrep's LowArgs → HiArgs): serde builds typed section
//! structs (unknown keys refused, narrow values such as [`vrrp::Vrid`] range-checked as they
//! are read), then each section's `validate` checks what one value cannot show (duplicates,
//! cross references, relations between keys). Every problem found is kept with its byte span
//! so `vipgate check` can print all of them as `FILE:LINE:COL: message` in one run. Then
//! [`lower`] turns valid sections into the libraries' configs.
//!
//! Each top-level section is deserialized on its own (and each element of an array of
//! tables on its own) so one mistake does not hide the next.

pub(crate) mod daemon;
pub(crate) mod duration;
pub(crate) mod gre;
pub(crate) mod host;
pub(crate) mod http;
pub(crate) mod include;
pub(crate) mod lb;
pub(crate) mod lower;
pub(crate) mod nat;
pub(crate) mod ssh;
pub(crate) mod sync;
pub(crate) mod vrrp;

use serde::de::DeserializeOwned;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub(crate) use duration::HumanDuration;

/// The whole validated site.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct SiteConfig {
    /// Where the file came from (for messages and reloads).
    #[serde(skip)]
    pub(crate) path: PathBuf,
    /// The files `include` brought in, in the order read.
    #[serde(skip)]
    pub(crate) included: Vec<PathBuf>,
    pub(crate) daemon: daemon::DaemonSection,
    pub(crate) gre: Vec<gre::GreSection>,
    pub(crate) nat: Option<nat::NatSection>,
    pub(crate) lb: Option<lb::LbSection>,
    pub(crate) service: Vec<lb::ServiceSection>,
    pub(crate) http: Vec<http::HttpSection>,
    pub(crate) vrrp: Vec<vrrp::VrrpSection>,
    pub(crate) vrrp_group: Vec<vrrp::VrrpGroupSection>,
    pub(crate) ssh: Vec<ssh::SshSection>,
    pub(crate) sshd: Option<ssh::SshdSection>,
    pub(crate) sync: Option<sync::SyncSection>,
    /// Things that work but deserve a second look, as `FILE:LINE:COL: warning: message`.
    #[serde(skip)]
    pub(crate) warnings: Vec<String>,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diagnostic {
    /// Byte range in the file, when known.
    pub(crate) span: Option<Range<usize>>,
    pub(crate) message: String,
}

/// All problems of one file and the files it includes, renderable as `FILE:LINE:COL: message`
/// lines (each in the file that holds the mistake).
#[derive(Debug, Clone)]
pub(crate) struct ConfigErrors {
    pub(crate) path: PathBuf,
    /// The main file's text with the included files' appended.
    pub(crate) text: String,
    /// Which file each part of `text` came from.
    pub(crate) sources: include::Sources,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

impl ConfigErrors {
    /// A problem with the file as a whole (unreadable, too large).
    fn whole_file(path: &Path, message: String) -> Self {
        ConfigErrors {
            path: path.to_path_buf(),
            text: String::new(),
            sources: include::Sources::single(path),
            diagnostics: vec![Diagnostic {
                span: None,
                message,
            }],
        }
    }
}

/// Largest config file read; a site config is a few KiB.
pub(crate) const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;
/// Diagnostics printed per file; the rest are counted in one last line.
pub(crate) const MAX_DIAGNOSTICS: usize = 100;

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines = LineStarts::new(&self.text);
        for (i, d) in self.diagnostics.iter().take(MAX_DIAGNOSTICS).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let (path, line, col) = d.span.as_ref().map_or((self.path.as_path(), 1, 1), |s| {
                self.sources.locate(&lines, &self.text, s.start)
            });
            write!(f, "{}:{line}:{col}: {}", path.display(), d.message)?;
        }
        if self.diagnostics.len() > MAX_DIAGNOSTICS {
            write!(
                f,
                "\n{}: … and {} more",
                self.path.display(),
                self.diagnostics.len() - MAX_DIAGNOSTICS
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Byte offsets where each line starts, so many diagnostics cost a binary search each
/// instead of a scan from the top of the file each.
#[derive(Debug, Default)]
pub(crate) struct LineStarts(Vec<usize>);

impl LineStarts {
    pub(crate) fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineStarts(starts)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn line_col(&self, text: &str, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.0.partition_point(|&s| s <= offset);
        let start = self.0.get(line.saturating_sub(1)).copied().unwrap_or(0);
        let col = text.get(start..offset).map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }
}

/// 1-based line and column (in characters) of a byte offset, by a scan from the top: the
/// reference [`LineStarts`] is tested against.
#[cfg(test)]
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Collects semantic problems with their spans while sections validate themselves.
#[derive(Debug, Default)]
pub(crate) struct Validator {
    text: String,
    lines: LineStarts,
    sources: include::Sources,
    diagnostics: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    /// The host's routes, when the file is checked against the host it runs on
    /// ([`load_on_host`]).
    host: Option<host::HostRoutes>,
}

impl Validator {
    /// The host's routes, when the file is checked against this host.
    pub(crate) fn host(&self) -> Option<&host::HostRoutes> {
        self.host.as_ref()
    }

    /// Where a byte offset is, for messages that point at a second place: `line 12`, or
    /// `line 3 of FILE` in an included file.
    pub(crate) fn place_of(&self, offset: usize) -> String {
        let (path, line, _) = self.sources.locate(&self.lines, &self.text, offset);
        if self.sources.paths().next() == Some(path) {
            format!("line {line}")
        } else {
            format!("line {line} of {}", path.display())
        }
    }

    /// Records a problem at `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            span: Some(span),
            message: message.into(),
        });
    }

    /// Records a warning (the file still loads) at the place a spanned value was written.
    pub(crate) fn warn_at<T>(&mut self, value: &toml::Spanned<T>, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            span: Some(value.span()),
            message: message.into(),
        });
    }

    /// Records a problem at the place a spanned value was written.
    pub(crate) fn error_at<T>(&mut self, value: &toml::Spanned<T>, message: impl Into<String>) {
        self.error(value.span(), message);
    }
}

/// The top-level sections the contract knows.
pub(crate) const SECTIONS: [&str; 11] = [
    "daemon",
    "gre",
    "nat",
    "lb",
    "service",
    "http",
    "vrrp",
    "vrrp_group",
    "ssh",
    "sshd",
    "sync",
];

/// One line on what a top-level section is, for vipgate.toml(5).
pub(crate) fn section_summary(section: &str) -> &'static str {
    match section {
        "daemon" => "the control socket, metrics endpoint and privileges of vipgate run",
        "gre" => "[[gre]]: a GRE (or GRE-in-UDP) site-to-site tunnel and its routes",
        "nat" => "the PAT gateway: inside and outside interfaces, overload address, port forwards",
        "lb" => "[lb]: a director's data path (a site with [[service]] and no [nat])",
        "service" => {
            "[[service]]: a load-balanced virtual service, its scheduler, backends and health check"
        }
        "http" => {
            "[[http]]: an HTTP virtual service: routes on host, path, method and headers to pools"
        }
        "vrrp" => {
            "[[vrrp]]: a VRRPv3 instance (keepalived vrrp_instance), tracking and notify scripts"
        }
        "vrrp_group" => {
            "[[vrrp_group]]: a sync group's own notify scripts (keepalived vrrp_sync_group)"
        }
        "ssh" => "[[ssh]]: an SSH destination with -L/-R/-D forwards, kept up",
        "sshd" => "the forwarding-only SSH server",
        "sync" => "[sync]: flow sync with the VRRP peers, so a failover keeps connections",
        _ => "",
    }
}

/// Reads and validates a config file.
///
/// # Errors
/// Every problem in the file, or an unreadable file as a single diagnostic.
pub(crate) fn load(path: &Path) -> Result<SiteConfig, ConfigErrors> {
    load_with(path, None)
}

/// Reads and validates a config file for this host: as [`load`], and what the file asks of
/// the host is checked too (a direct-routing service's real servers on a directly connected
/// network). What `vipgate run` and `vipgate check --host` use.
///
/// # Errors
/// As [`load`], plus the file's mismatches with this host.
pub(crate) fn load_on_host(path: &Path) -> Result<SiteConfig, ConfigErrors> {
    let routes = match host::HostRoutes::read() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this host's routes: direct-routing backends are not checked");
            None
        }
    };
    load_with(path, routes)
}

fn load_with(path: &Path, host: Option<host::HostRoutes>) -> Result<SiteConfig, ConfigErrors> {
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_CONFIG_BYTES);
    if too_big {
        return Err(ConfigErrors::whole_file(
            path,
            format!("the file is larger than {MAX_CONFIG_BYTES} bytes"),
        ));
    }
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                return Err(ConfigErrors::whole_file(
                    path,
                    "not a TOML file: the file is not UTF-8 text".into(),
                ));
            }
        },
        Err(e) => return Err(ConfigErrors::whole_file(path, format!("cannot read: {e}"))),
    };
    let (text, sources, mut diags) = include::expand(path, &text);
    let mut site = parse_into(path, &text, &sources, &mut diags, host);
    site.included = sources.paths().skip(1).map(Path::to_path_buf).collect();
    finish(site, text, sources, diags)
}

/// Parses and validates config text; `path` is only used for messages.
///
/// # Errors
/// Every problem found, in file order.
/// Reads no other file: an `include` key is checked, not followed ([`load`] follows it).
pub(crate) fn parse(path: &Path, text: &str) -> Result<SiteConfig, ConfigErrors> {
    let mut diags = Vec::new();
    let sources = include::Sources::single(path);
    let site = parse_into(path, text, &sources, &mut diags, None);
    finish(site, text.to_owned(), sources, diags)
}

/// [`parse`] with the host checks against `routes` (what [`load_on_host`] reads).
#[cfg(test)]
pub(crate) fn parse_on_host(
    path: &Path,
    text: &str,
    routes: host::HostRoutes,
) -> Result<SiteConfig, ConfigErrors> {
    let mut diags = Vec::new();
    let sources = include::Sources::single(path);
    let site = parse_into(path, text, &sources, &mut diags, Some(routes));
    finish(site, text.to_owned(), sources, diags)
}

/// The site, or every problem in file order.
fn finish(
    site: SiteConfig,
    text: String,
    sources: include::Sources,
    mut diags: Vec<Diagnostic>,
) -> Result<SiteConfig, ConfigErrors> {
    if diags.is_empty() {
        Ok(site)
    } else {
        diags.sort_by_key(|d| d.span.as_ref().map_or(0, |s| s.start));
        Err(ConfigErrors {
            path: site.path,
            text,
            sources,
            diagnostics: diags,
        })
    }
}

fn parse_into(
    path: &Path,
    text: &str,
    sources: &include::Sources,
    diags: &mut Vec<Diagnostic>,
    host: Option<host::HostRoutes>,
) -> SiteConfig {
    let mut site = SiteConfig {
        path: path.to_path_buf(),
        ..SiteConfig::default()
    };
    if text.trim().is_empty() {
        diags.push(Diagnostic {
            span: None,
            message: format!(
                "the file is empty: a site config has at least one of the sections [{}]",
                SECTIONS.join("], [")
            ),
        });
        return site;
    }
    let (table, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            diags.push(Diagnostic {
                span: e.span(),
                message: format!("not valid TOML: {}", first_line(e.message())),
            });
        }
        return site;
    }
    // Sections that failed to deserialize: cross-references into them are not checked,
    // so one typo does not cascade into misleading "no such service" errors.
    let mut failed: Vec<String> = Vec::new();
    for (key, value) in table.into_inner() {
        let name = key.get_ref().as_ref();
        let before = diags.len();
        match name {
            "daemon" => {
                if let Some(d) = one(value, name, diags) {
                    site.daemon = d;
                }
            }
            "gre" => site.gre = many(value, name, diags),
            "nat" => site.nat = one(value, name, diags),
            "lb" => site.lb = one(value, name, diags),
            "service" => site.service = many(value, name, diags),
            "http" => site.http = many(value, name, diags),
            "vrrp" => site.vrrp = many(value, name, diags),
            "vrrp_group" => site.vrrp_group = many(value, name, diags),
            "ssh" => site.ssh = many(value, name, diags),
            "sshd" => site.sshd = one(value, name, diags),
            "sync" => site.sync = one(value, name, diags),
            // Followed by `load` before this parse; here only its shape is checked.
            "include" => {
                let paths = match value.get_ref() {
                    DeValue::Array(items) => items
                        .iter()
                        .all(|i| matches!(i.get_ref(), DeValue::String(_))),
                    _ => false,
                };
                if !paths {
                    diags.push(Diagnostic {
                        span: Some(value.span()),
                        message: "include must be a list of files or patterns: include = [\"/etc/vipgate/conf.d/*.toml\"]".into(),
                    });
                }
            }
            other => diags.push(Diagnostic {
                span: Some(key.span()),
                message: format!(
                    "unknown section `{other}`{}; the sections are [{}]",
                    did_you_mean(other, &SECTIONS),
                    SECTIONS.join("], [")
                ),
            }),
        }
        if diags.len() > before {
            failed.push(name.to_string());
        }
    }
    let mut v = Validator {
        text: text.to_string(),
        lines: LineStarts::new(text),
        sources: sources.clone(),
        host,
        ..Validator::default()
    };
    site.validate(&failed, &mut v);
    diags.extend(v.diagnostics);
    site.warnings = v
        .warnings
        .iter()
        .map(|w| {
            let (file, line, col) = w
                .span
                .as_ref()
                .map_or((path, 1, 1), |s| sources.locate(&v.lines, text, s.start));
            format!("{}:{line}:{col}: warning: {}", file.display(), w.message)
        })
        .collect();
    site
}

impl SiteConfig {
    fn validate(&self, failed: &[String], v: &mut Validator) {
        let ok = |section: &str| !failed.iter().any(|f| f == section);
        if ok("daemon") {
            self.daemon.validate(v);
        }
        gre::validate_all(&self.gre, v);
        if let Some(nat) = &self.nat {
            nat.validate(v);
        }
        if let Some(lb) = &self.lb {
            lb.validate(self.nat.is_some(), v);
        }
        // The data path the services run on: [nat]'s where they join a PAT gateway, [lb]'s
        // on a director.
        let datapath = match &self.nat {
            Some(nat) => nat.datapath.as_ref(),
            None => self.lb.as_ref().and_then(|lb| lb.datapath.as_ref()),
        };
        lb::validate_all(
            &self.service,
            self.nat.as_ref().filter(|_| ok("nat")),
            datapath,
            v,
        );
        http::validate_all(&self.http, v);
        vrrp::validate_all(
            &self.vrrp,
            ok("service").then_some(self.service.as_slice()),
            &self.http,
            v,
        );
        if ok("vrrp") {
            vrrp::validate_groups(&self.vrrp_group, &self.vrrp, v);
        }
        ssh::validate_all(&self.ssh, ok("ssh"), v);
        if let Some(sshd) = &self.sshd {
            sshd.validate(v);
        }
        if let Some(sync) = &self.sync {
            sync.validate(
                ok("vrrp").then_some(self.vrrp.as_slice()),
                self.nat.is_some() || !self.service.is_empty() || !ok("nat") || !ok("service"),
                v,
            );
            if let Some(nat) = self.nat.as_ref().filter(|_| ok("nat") && ok("vrrp")) {
                sync.validate_pat_pair(nat.address, &self.vrrp, v);
            }
        }
    }

    /// True when the file configures nothing that runs.
    pub(crate) fn is_empty(&self) -> bool {
        self.gre.is_empty()
            && self.nat.is_none()
            && self.service.is_empty()
            && self.http.is_empty()
            && self.vrrp.is_empty()
            && self.ssh.is_empty()
            && self.sshd.is_none()
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

fn one<T: DeserializeOwned>(
    value: toml::Spanned<DeValue<'_>>,
    section: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    if !matches!(value.get_ref(), DeValue::Table(_)) {
        diags.push(Diagnostic {
            span: Some(value.span()),
            message: format!("`{section}` must be a table: write it as [{section}]"),
        });
        return None;
    }
    deserialize(value, diags)
}

fn many<T: DeserializeOwned>(
    value: toml::Spanned<DeValue<'_>>,
    section: &str,
    diags: &mut Vec<Diagnostic>,
) -> Vec<T> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items
            .into_iter()
            .filter_map(|item| deserialize(item, diags))
            .collect(),
        _ => {
            diags.push(Diagnostic {
                span: Some(span),
                message: format!(
                    "`{section}` must be an array of tables: write each one as [[{section}]]"
                ),
            });
            Vec::new()
        }
    }
}

/// Deserializes one section, reporting every key serde refuses rather than only the first.
///
/// serde stops at the first bad key, so after each error the offending key is cut out of a
/// copy of the section and deserialization runs again: an unknown or mistyped key is removed
/// (its default applies for the rest of the checks), and a table left without a required key
/// by that cut is removed as a whole (a `missing field` caused by the cut is not reported).
/// What remains deserializes, so the section's own range checks still run. `repaired` tells
/// the caller that values were cut out, so cross references into the section are not trusted.
fn deserialize<T: DeserializeOwned>(
    value: toml::Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<T> {
    let mut value = value;
    // Keys cut out so far, as (span of their table, key name).
    let mut cut: Vec<(Range<usize>, String)> = Vec::new();
    for _ in 0..=MAX_DIAGNOSTICS {
        let span = value.span();
        let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let at = e.span().unwrap_or(span);
        let message = first_line(e.message());
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field.to_string());
        let caused_by_cut = missing.as_ref().is_some_and(|field| {
            cut.iter()
                .any(|(table, key)| key == field && table.start <= at.start && at.end <= table.end)
        });
        if !caused_by_cut {
            diags.push(Diagnostic {
                span: Some(at.clone()),
                message: explain_serde_error(message),
            });
        }
        let removed = if missing.is_some() {
            remove_innermost(&mut value, &at, Removal::Containing)
        } else {
            remove_innermost(&mut value, &at, Removal::Key)
        };
        match removed {
            Some(entry) => cut.push(entry),
            None => return None,
        }
    }
    None
}

/// What [`remove_innermost`] cuts out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// The innermost table key whose key or value holds the span (a bad key).
    Key,
    /// The innermost table or array element whose value is the span (a table missing a key).
    Containing,
}

/// Cuts the innermost entry around `at` out of `value` (see [`Removal`]) and returns the span
/// of the table it was in with its key name (an array element: its index); `None` when `at`
/// is `value` itself, so nothing smaller than the whole value can go.
fn remove_innermost(
    value: &mut toml::Spanned<DeValue<'_>>,
    at: &Range<usize>,
    how: Removal,
) -> Option<(Range<usize>, String)> {
    let holds = |s: Range<usize>| s.start <= at.start && at.end <= s.end && s != *at;
    let table_span = value.span();
    match value.get_mut() {
        DeValue::Table(table) => {
            let key = table
                .iter()
                .find(|(k, v)| holds(v.span()) || (how == Removal::Key && k.span() == *at))
                .or_else(|| {
                    table
                        .iter()
                        .find(|(k, v)| v.span() == *at || k.span() == *at)
                })
                .map(|(k, _)| k.get_ref().to_string())?;
            let inner = table.get_mut(key.as_str())?;
            let deeper = if inner.span() == *at {
                None
            } else {
                remove_innermost(inner, at, how)
            };
            deeper.or_else(|| {
                table.remove(key.as_str());
                Some((table_span, key))
            })
        }
        DeValue::Array(items) => {
            let i = items.iter().position(|item| {
                let s = item.span();
                s.start <= at.start && at.end <= s.end
            })?;
            let deeper = if items[i].span() == *at {
                None
            } else {
                remove_innermost(&mut items.as_mut()[i], at, how)
            };
            match deeper {
                Some(entry) => Some(entry),
                // An element of an array of values is not cut alone (that would change what
                // the list means); the key holding the array goes instead.
                None if how == Removal::Key => None,
                None => {
                    let mut kept = toml::de::DeArray::new();
                    for (j, item) in items.iter().enumerate() {
                        if j != i {
                            kept.push(item.clone());
                        }
                    }
                    *items = kept;
                    Some((table_span, i.to_string()))
                }
            }
        }
        _ => None,
    }
}

/// Rewrites serde's messages into the config's vocabulary, adding "did you mean" hints.
fn explain_serde_error(message: &str) -> String {
    let message = first_line(message);
    for (prefix, noun, list) in [
        ("unknown field `", "key", "valid keys here"),
        ("unknown variant `", "value", "expected one of"),
    ] {
        if let Some((word, expected)) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
        {
            let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            return format!(
                "unknown {noun} `{word}`{}; {list}: {}",
                did_you_mean(word, &candidates),
                candidates.join(", ")
            );
        }
    }
    message.to_string()
}

/// ", did you mean `x`?" when a candidate is close enough to be a likely typo.
pub(crate) fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    // Transpositions and one-letter slips in short names score low on Jaro-Winkler alone.
    let close = |c: &str| strsim::damerau_levenshtein(word, c) <= (word.len() / 3).max(1);
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, c)| *score > 0.8 || close(c))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Deserializes an integer and narrows it with `new`, or fails with `message(n)`: serde puts
/// the value's position on the error, and nothing after parsing narrows the value again.
pub(crate) fn narrow<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    new: impl FnOnce(i64) -> Option<T>,
    message: impl FnOnce(i64) -> String,
) -> Result<T, D::Error> {
    let n = <i64 as serde::Deserialize>::deserialize(d)?;
    new(n).ok_or_else(|| serde::de::Error::custom(message(n)))
}

/// Reports every value that appears more than once, at its second and later places.
pub(crate) fn check_unique<'a, K: Eq + std::hash::Hash + std::fmt::Display + 'a>(
    items: impl IntoIterator<Item = (K, Range<usize>)>,
    what: &str,
    v: &mut Validator,
) {
    let mut seen: std::collections::HashMap<K, Range<usize>> = std::collections::HashMap::new();
    for (key, span) in items {
        if let Some(first) = seen.get(&key) {
            let first = first.clone();
            let place = v.place_of(first.start);
            v.error(
                span,
                format!("duplicate {what} `{key}` (first defined on {place})"),
            );
        } else {
            seen.insert(key, span);
        }
    }
}

#[cfg(test)]
mod tests;
