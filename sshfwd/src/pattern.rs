//! OpenSSH pattern lists (`*` and `?` wildcards, `!` negation), as used by `Host` in
//! ssh_config, host names in known_hosts and `from=` in authorized_keys. Pure.

/// Matches `text` against one wildcard pattern (`*` any run, `?` one character).
/// Case-insensitive, as OpenSSH compares host names.
#[must_use]
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    match_chars(&p, &t)
}

/// [`wildcard_match`] comparing case, as file names are (`Include` globs).
#[must_use]
pub fn wildcard_match_exact(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    match_chars(&p, &t)
}

fn match_chars(p: &[char], t: &[char]) -> bool {
    // Iterative matcher with one backtrack point: linear in practice, never recursive, so a
    // hostile pattern cannot blow the stack.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Result of matching a comma-separated pattern list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListMatch {
    /// Some positive pattern matched and no negated one did.
    Match,
    /// A `!pattern` matched: the whole list is a refusal, whatever else matched.
    Negated,
    /// Nothing matched.
    NoMatch,
}

/// Matches `text` against a list of patterns (OpenSSH `match_pattern_list`): a negated match
/// wins over any positive one.
pub fn match_list<'a>(patterns: impl IntoIterator<Item = &'a str>, text: &str) -> ListMatch {
    let mut result = ListMatch::NoMatch;
    for pat in patterns {
        let pat = pat.trim();
        if let Some(neg) = pat.strip_prefix('!') {
            if wildcard_match(neg, text) {
                return ListMatch::Negated;
            }
        } else if !pat.is_empty() && wildcard_match(pat, text) {
            result = ListMatch::Match;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*.example.com", "a.b.example.com"));
        assert!(!wildcard_match("*.example.com", "example.com"));
        assert!(wildcard_match("10.0.0.?", "10.0.0.7"));
        assert!(!wildcard_match("10.0.0.?", "10.0.0.17"));
        assert!(wildcard_match("WEB*", "web1"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXbYY"));
        assert!(wildcard_match_exact("*.conf", "a.conf"));
        assert!(!wildcard_match_exact("*.conf", "A.CONF"));
    }

    #[test]
    fn lists() {
        assert_eq!(
            match_list("*.lan,!bad.lan".split(','), "good.lan"),
            ListMatch::Match
        );
        assert_eq!(
            match_list("*.lan,!bad.lan".split(','), "bad.lan"),
            ListMatch::Negated
        );
        assert_eq!(match_list("*.lan".split(','), "x.org"), ListMatch::NoMatch);
    }

    proptest! {
        #[test]
        fn literal_matches_itself(s in "[a-z0-9.\\-]{0,20}") {
            prop_assert!(wildcard_match(&s, &s));
            prop_assert!(wildcard_match("*", &s));
        }

        #[test]
        fn never_panics(p in ".{0,16}", t in ".{0,16}") {
            let _ = wildcard_match(&p, &t);
            let _ = match_list(p.split(','), &t);
        }
    }
}
