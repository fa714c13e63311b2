//! `include = ["/etc/vipgate/conf.d/*.toml"]`: a site spread over several files.
//!
//! The main file's top-level `include` lists files or patterns (`*` and `?` in the last path
//! component only; relative to the main file's folder). The matches of each entry are taken
//! in name order, entries in the order written, each file once, and appended to the main file's
//! text; the whole is then parsed as one document, so `[[vrrp]]`, `[[service]]`, ... add up
//! across files, and a section that is one table (`[nat]`, `[daemon]`, `[sshd]`) defined in two
//! files is a duplicate. [`Sources`] maps every byte of the combined text back to its file, so
//! every problem is reported as `FILE:LINE:COL` of the file that holds it.
//!
//! Invariants: an included file starts with a `[section]` header (a bare key there would
//! belong to the previous file's last table), includes nothing itself, and is read only if
//! the total stays within [`MAX_CONFIG_BYTES`]; at most [`MAX_INCLUDED_FILES`] files.

use super::{Diagnostic, LineStarts, MAX_CONFIG_BYTES};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// Most files one `include` may bring in.
pub(crate) const MAX_INCLUDED_FILES: usize = 64;

/// Where each file's text starts in the combined text, in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources(Vec<(PathBuf, usize)>);

impl Sources {
    /// One file, the whole text.
    pub(crate) fn single(path: &Path) -> Self {
        Sources(vec![(path.to_path_buf(), 0)])
    }

    /// The file holding byte `offset` of `text` (whose line starts are `lines`), and the
    /// 1-based line and column there. Every file starts at a line start of `text`.
    pub(crate) fn locate<'s>(
        &'s self,
        lines: &LineStarts,
        text: &str,
        offset: usize,
    ) -> (&'s Path, usize, usize) {
        let i = self
            .0
            .partition_point(|(_, start)| *start <= offset)
            .saturating_sub(1);
        let Some((path, start)) = self.0.get(i) else {
            return (Path::new(""), 1, 1);
        };
        let (first_line, _) = lines.line_col(text, *start);
        let (line, col) = lines.line_col(text, offset);
        (path, line + 1 - first_line, col)
    }

    /// The files, main first.
    pub(crate) fn paths(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().map(|(p, _)| p.as_path())
    }
}

/// The main file's text with every included file appended, where each starts, and the
/// problems found while including (spans into the combined text).
pub(crate) fn expand(path: &Path, text: &str) -> (String, Sources, Vec<Diagnostic>) {
    let mut combined = text.to_owned();
    let mut sources = Sources::single(path);
    let mut diags = Vec::new();
    let (table, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // The parse of the combined text reports them.
        return (combined, sources, diags);
    }
    let Some(entries) = table
        .get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == "include")
        .and_then(|(_, v)| match v.get_ref() {
            DeValue::Array(items) => Some(items.clone()),
            // Not a list: the config's own validation says what it should be.
            _ => None,
        })
    else {
        return (combined, sources, diags);
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut seen: Vec<PathBuf> = vec![canonical(path)];
    for entry in entries {
        let span = entry.span();
        let DeValue::String(pattern) = entry.get_ref() else {
            continue;
        };
        let files = match matches(base, pattern) {
            Ok(f) => f,
            Err(message) => {
                diags.push(at(span, message));
                continue;
            }
        };
        for file in files {
            let key = canonical(&file);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            if sources.0.len() > MAX_INCLUDED_FILES {
                diags.push(at(
                    span.clone(),
                    format!("more than {MAX_INCLUDED_FILES} included files"),
                ));
                return (combined, sources, diags);
            }
            let room = MAX_CONFIG_BYTES.saturating_sub(combined.len() as u64);
            let included = match read_bounded(&file, room) {
                Ok(t) => t,
                Err(message) => {
                    diags.push(at(span.clone(), format!("{}: {message}", file.display())));
                    continue;
                }
            };
            if !combined.ends_with('\n') {
                combined.push('\n');
            }
            let start = combined.len();
            if let Some(offset) = first_bare_key(&included) {
                diags.push(at(
                    start + offset..start + offset + 1,
                    "an included file holds [sections] only: this key would land in the previous file's last table; move it under a [section] header",
                ));
            }
            combined.push_str(&included);
            sources.0.push((file, start));
        }
    }
    (combined, sources, diags)
}

fn at(span: Range<usize>, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        span: Some(span),
        message: message.into(),
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The files one `include` entry names: a path, or a pattern in its last component (sorted,
/// hidden files left out unless the pattern starts with a dot).
fn matches(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let full = base.join(pattern);
    let name = full
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("include `{pattern}` does not name a file"))?;
    let dir = full.parent().unwrap_or(base);
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(format!(
            "include `{pattern}`: wildcards are allowed in the file name only"
        ));
    }
    if !name.contains(['*', '?']) {
        return if full.is_file() {
            Ok(vec![full])
        } else {
            Err(format!("include `{pattern}`: no such file"))
        };
    }
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        // An absent conf.d is an empty one.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("include `{pattern}`: {}: {e}", dir.display())),
    };
    let mut found: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                (!n.starts_with('.') || name.starts_with('.')) && wildcard(name, n)
            })
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// Shell-style match of `name` against `pattern` with `*` (any run) and `?` (one character).
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // The last `*` seen and the name position it was tried at: backtrack there on a mismatch.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Reads a UTF-8 file of at most `room` bytes.
fn read_bounded(path: &Path, room: u64) -> Result<String, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > room {
        return Err(format!(
            "the files together are larger than {MAX_CONFIG_BYTES} bytes"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "not a TOML file: the file is not UTF-8 text".into())
}

/// Byte offset of the first line that is neither blank, a comment nor a `[` header, if that
/// comes before any header (a key at the top of an included file).
fn first_bare_key(text: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            return None;
        }
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            return Some(offset + (line.len() - trimmed.len()));
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_a_shell_in_one_component() {
        for (p, n, want) in [
            ("*.toml", "a.toml", true),
            ("*.toml", ".toml", true),
            ("*.toml", "a.toml.bak", false),
            ("?.toml", "ab.toml", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("*", "", true),
            ("", "a", false),
        ] {
            assert_eq!(wildcard(p, n), want, "{p} vs {n}");
        }
    }

    #[test]
    fn a_key_before_the_first_header_is_found() {
        assert_eq!(first_bare_key("# c\n\n[[vrrp]]\nname = 1\n"), None);
        assert_eq!(first_bare_key("# c\n  name = 1\n[nat]\n"), Some(6));
        assert_eq!(first_bare_key(""), None);
    }

    #[test]
    fn offsets_map_back_to_each_file() {
        let text = "a = 1\nb = 2\n[x]\nc = 3\n";
        let lines = LineStarts::new(text);
        let sources = Sources(vec![("main".into(), 0), ("inc".into(), 12)]);
        assert_eq!(sources.locate(&lines, text, 6), (Path::new("main"), 2, 1));
        assert_eq!(sources.locate(&lines, text, 12), (Path::new("inc"), 1, 1));
        assert_eq!(sources.locate(&lines, text, 17), (Path::new("inc"), 2, 2));
    }
}
