//! Which certificate a TLS client gets: the server name it sent (SNI) against the DNS names of
//! each certificate's subjectAltName, as a browser would check them afterwards.
//!
//! An exact name wins over a wildcard; a wildcard `*.example.com` stands for exactly one
//! label (`a.example.com`, not `a.b.example.com` nor `example.com`), as RFC 6125 §6.4.3 has a
//! client check it. Among certificates claiming the same name the first listed wins. A client
//! without SNI, or with a name no certificate holds, gets the default (the first listed), as
//! HAProxy's first `crt` and nginx's `default_server` do. Pure: names in, an index out.

use std::collections::HashMap;

/// Most names one certificate may contribute (a bound on memory from a hostile file).
pub const MAX_NAMES_PER_CERT: usize = 1000;

/// Names to certificate indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SniTable {
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, usize>,
}

/// `name` lower-cased without a trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl SniTable {
    /// A table over certificates given as their DNS names, in order (index 0 is the default).
    /// Names beyond [`MAX_NAMES_PER_CERT`] of one certificate are ignored.
    #[must_use]
    pub fn new<I, N, S>(certs: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut table = Self::default();
        for (index, names) in certs.into_iter().enumerate() {
            for name in names.into_iter().take(MAX_NAMES_PER_CERT) {
                let name = normalise(name.as_ref());
                let (map, key) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut table.wildcard, rest.to_owned()),
                    None => (&mut table.exact, name),
                };
                map.entry(key).or_insert(index);
            }
        }
        table
    }

    /// The certificate for a client that sent `sni` (`None`: no SNI): a holder of the exact
    /// name, else of the wildcard one label up, else 0 (the default).
    #[must_use]
    pub fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let name = normalise(sni);
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        name.split_once('.')
            .filter(|(label, _)| !label.is_empty())
            .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SniTable {
        SniTable::new([
            vec!["default.test"],
            vec!["a.example.com", "*.example.com"],
            vec!["b.example.com", "*.b.example.com"],
            vec!["A.Example.com", "shadowed.test"],
        ])
    }

    #[test]
    fn exact_beats_wildcard_and_first_listed_wins() {
        let t = table();
        assert_eq!(t.pick(Some("a.example.com")), 1);
        assert_eq!(t.pick(Some("b.example.com")), 2);
        assert_eq!(t.pick(Some("x.example.com")), 1);
        assert_eq!(t.pick(Some("x.b.example.com")), 2);
        assert_eq!(t.pick(Some("shadowed.test")), 3);
        // Case and a trailing dot do not matter.
        assert_eq!(t.pick(Some("A.EXAMPLE.COM.")), 1);
    }

    #[test]
    fn wildcards_cover_one_label_only() {
        let t = table();
        // Two labels below example.com: not *.example.com's; *.b.example.com does not hold y.x.
        assert_eq!(t.pick(Some("y.x.example.com")), 0);
        assert_eq!(t.pick(Some("example.com")), 0);
        assert_eq!(t.pick(Some(".example.com")), 0);
        assert_eq!(t.pick(Some("z.example.com")), 1);
    }

    #[test]
    fn no_or_unknown_sni_gets_the_default() {
        let t = table();
        assert_eq!(t.pick(None), 0);
        assert_eq!(t.pick(Some("unknown.test")), 0);
        assert_eq!(t.pick(Some("")), 0);
        assert_eq!(SniTable::default().pick(Some("a.example.com")), 0);
    }

    #[test]
    fn names_per_certificate_are_bounded() {
        let many: Vec<String> = (0..MAX_NAMES_PER_CERT + 10)
            .map(|i| format!("h{i}.test"))
            .collect();
        let t = SniTable::new([vec!["d.test".to_owned()], many]);
        assert_eq!(t.pick(Some("h0.test")), 1);
        assert_eq!(
            t.pick(Some(&format!("h{}.test", MAX_NAMES_PER_CERT - 1))),
            1
        );
        assert_eq!(t.pick(Some(&format!("h{MAX_NAMES_PER_CERT}.test"))), 0);
    }
}
