//! ssh_config files on disk for [`crate::options`]: the top file (`-F`, `~/.ssh/config`,
//! `/etc/ssh/ssh_config`) and `Include` globs, with ssh's rules — relative `Include` paths are
//! taken from `~/.ssh` (from `/etc/ssh` in the system file), a glob that matches nothing is no
//! error, and included files, like `~/.ssh/config`, must not be writable by others.
//!
//! Bounds: no file over [`MAX_CONFIG_BYTES`] is read past that size, and one glob yields at
//! most [`MAX_CONFIG_FILES`] names (the walk in `options` bounds the rest).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::options::{
    ConfigText, IncludeLoader, MAX_CONFIG_BYTES, MAX_CONFIG_FILES, OptionError, expand_tilde,
};
use crate::pattern::wildcard_match_exact;

/// Reads `Include`d files for one config walk.
#[derive(Debug, Clone)]
pub struct ConfigFiles {
    /// Where relative `Include` paths start.
    base: PathBuf,
    home: Option<String>,
}

impl ConfigFiles {
    /// For the user's files (`-F`, `~/.ssh/config`): relative includes are in `~/.ssh`.
    #[must_use]
    pub fn user(home: Option<&str>) -> Self {
        ConfigFiles {
            base: PathBuf::from(expand_tilde("~/.ssh", home)),
            home: home.map(str::to_string),
        }
    }

    /// For the system file: relative includes are in `/etc/ssh`.
    #[must_use]
    pub fn system(home: Option<&str>) -> Self {
        ConfigFiles {
            base: PathBuf::from("/etc/ssh"),
            home: home.map(str::to_string),
        }
    }
}

/// Reads one config file; `Ok(None)` when it does not exist. With `check_mode`, a file
/// others could write is refused, as ssh refuses it.
///
/// # Errors
/// An unreadable, oversized or unsafe file.
pub fn read_config_file(path: &Path, check_mode: bool) -> Result<Option<ConfigText>, OptionError> {
    let name = path.display().to_string();
    let fail = |why: String| OptionError::Include {
        pattern: name.clone(),
        why,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    if check_mode {
        super::server::check_file_mode(path, false).map_err(|e| fail(e.to_string()))?;
    }
    let mut text = String::new();
    let limit = u64::try_from(MAX_CONFIG_BYTES).unwrap_or(u64::MAX) + 1;
    file.take(limit)
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    if text.len() > MAX_CONFIG_BYTES {
        return Err(OptionError::Limit(format!(
            "{name}: larger than {MAX_CONFIG_BYTES} bytes"
        )));
    }
    Ok(Some(ConfigText { name, text }))
}

impl IncludeLoader for ConfigFiles {
    fn load(&mut self, pattern: &str) -> Result<Vec<ConfigText>, OptionError> {
        let expanded = expand_tilde(pattern, self.home.as_deref());
        let path = Path::new(&expanded);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        };
        let mut out = Vec::new();
        for file in glob(&path, pattern)? {
            if file.is_dir() {
                continue;
            }
            if let Some(text) = read_config_file(&file, true)? {
                out.push(text);
            }
        }
        Ok(out)
    }
}

fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Expands `*` and `?` in each component of an absolute path, in name order; hidden names
/// match only a pattern that starts with a dot, as glob(3) does.
fn glob(path: &Path, pattern: &str) -> Result<Vec<PathBuf>, OptionError> {
    let mut found = vec![PathBuf::from("/")];
    for component in path.components() {
        let Component::Normal(part) = component else {
            if let Component::ParentDir = component {
                found.iter_mut().for_each(|p| p.push(".."));
            }
            continue;
        };
        let part = part.to_string_lossy();
        if !is_pattern(&part) {
            found.iter_mut().for_each(|p| p.push(part.as_ref()));
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    (!n.starts_with('.') || part.starts_with('.')) && wildcard_match_exact(&part, n)
                })
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
            if next.len() > MAX_CONFIG_FILES {
                return Err(OptionError::Include {
                    pattern: pattern.to_string(),
                    why: format!("matches more than {MAX_CONFIG_FILES} files"),
                });
            }
        }
        found = next;
    }
    found.retain(|p| p.exists());
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn globs_relative_to_base_and_checks_modes() {
        let dir = std::env::temp_dir().join(format!("vipgate-cfg-{}", std::process::id()));
        let ssh = dir.join(".ssh");
        std::fs::create_dir_all(ssh.join("conf.d")).unwrap();
        std::fs::write(ssh.join("conf.d/b.conf"), "Port 2\n").unwrap();
        std::fs::write(ssh.join("conf.d/a.conf"), "Port 1\n").unwrap();
        std::fs::write(ssh.join("conf.d/.hidden.conf"), "Port 3\n").unwrap();
        std::fs::write(ssh.join("conf.d/c.txt"), "Port 4\n").unwrap();
        let home = dir.display().to_string();
        let mut files = ConfigFiles::user(Some(&home));
        let names = |v: Vec<ConfigText>| {
            v.into_iter()
                .map(|f| f.name.rsplit('/').next().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(files.load("conf.d/*.conf").unwrap()),
            ["a.conf", "b.conf"]
        );
        assert_eq!(
            names(files.load("~/.ssh/conf.d/b.conf").unwrap()),
            ["b.conf"]
        );
        assert!(files.load("nowhere/*").unwrap().is_empty());
        assert!(files.load("conf.d/missing.conf").unwrap().is_empty());
        let a = ssh.join("conf.d/a.conf");
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = files.load("conf.d/a.conf").unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        assert!(
            read_config_file(&a, false).unwrap().is_some(),
            "-F is not mode-checked"
        );
        std::fs::write(ssh.join("big"), "#".repeat(MAX_CONFIG_BYTES + 1)).unwrap();
        assert!(read_config_file(&ssh.join("big"), false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
