//! Durations as users write them in the config: `"100ms"`, `"2s"`, `"5m"`, `"2h4m"`, `"1h30m15s"`.
//!
//! Units are `ms`, `s`, `m`, `h`, `d`; components must come from the largest unit to the smallest,
//! each at most once. A bare number is refused: `"300"` is ambiguous (ipvsadm means seconds,
//! keepalived sometimes centiseconds) and the error says so.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration parsed from the config's human form; displays back in the same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct HumanDuration(pub(crate) Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const UNITS: [(&str, u128); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |m: &str| DurationError(format!("invalid duration {s:?}: {m}"));
        if s.is_empty() {
            return Err(err("empty; write e.g. \"2s\", \"100ms\" or \"2h4m\""));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("a unit is required (ms, s, m, h, d), e.g. \"300s\""));
        }
        let mut total_ms: u128 = 0;
        let mut rest = s;
        // Index into UNITS of the last unit seen: units must strictly decrease.
        let mut last_unit: Option<usize> = None;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("expected a number before each unit"));
            }
            let (num, tail) = rest.split_at(digits);
            let value: u128 = num.parse().map_err(|_| err("number too large"))?;
            let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
            let (unit, tail) = tail.split_at(unit_len);
            let idx = UNITS.iter().position(|(u, _)| *u == unit).ok_or_else(|| {
                if unit.is_empty() {
                    err("missing unit after the last number (ms, s, m, h, d)")
                } else {
                    err(&format!("unknown unit {unit:?} (use ms, s, m, h, d)"))
                }
            })?;
            if last_unit.is_some_and(|l| l >= idx) {
                return Err(err("units must go from largest to smallest, each once"));
            }
            last_unit = Some(idx);
            total_ms = value
                .checked_mul(UNITS[idx].1)
                .and_then(|v| v.checked_add(total_ms))
                .ok_or_else(|| err("too large"))?;
            rest = tail;
        }
        let ms = u64::try_from(total_ms).map_err(|_| err("too large"))?;
        Ok(HumanDuration(Duration::from_millis(ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in UNITS {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Records a diagnostic at `value` when it is shorter than `min`: "`KEY` must be at least MIN".
///
/// For values that misbehave when tiny (a `0s` interval spins, a `0s` timeout fails every try).
/// A default written as `Spanned::new(0..0, ..)` must itself satisfy `min`.
#[allow(
    dead_code,
    reason = "the area validators (gre, nat, lb, vrrp, ssh) call it; remove once merged"
)]
pub(crate) fn check_at_least(
    value: &toml::Spanned<HumanDuration>,
    min: Duration,
    key: &str,
    v: &mut super::Validator,
) {
    if value.get_ref().0 < min {
        v.error_at(
            value,
            format!(
                "`{key}` must be at least {} (got {})",
                HumanDuration(min),
                value.get_ref()
            ),
        );
    }
}

/// Records a diagnostic at `value` when it is longer than `max`: "`KEY` must be at most MAX".
#[allow(
    dead_code,
    reason = "the area validators (gre, nat, lb, vrrp, ssh) call it; remove once merged"
)]
pub(crate) fn check_at_most(
    value: &toml::Spanned<HumanDuration>,
    max: Duration,
    key: &str,
    v: &mut super::Validator,
) {
    if value.get_ref().0 > max {
        v.error_at(
            value,
            format!(
                "`{key}` must be at most {} (got {})",
                HumanDuration(max),
                value.get_ref()
            ),
        );
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(s: &str) -> u128 {
        s.parse::<HumanDuration>().unwrap().0.as_millis()
    }

    #[test]
    fn parses_contract_examples() {
        assert_eq!(ms("100ms"), 100);
        assert_eq!(ms("2s"), 2000);
        assert_eq!(ms("2h4m"), 7_440_000);
        assert_eq!(ms("1d"), 86_400_000);
        assert_eq!(ms("1m30s500ms"), 90_500);
    }

    #[test]
    fn refuses_bad_forms() {
        for bad in [
            "",
            "300",
            "2x",
            "s",
            "2s3m",
            "2s2s",
            "1.5s",
            "-1s",
            "2 s",
            "99999999999999999999999d",
        ] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad:?} accepted");
        }
        let e = "300".parse::<HumanDuration>().unwrap_err().to_string();
        assert!(e.contains("unit is required"), "{e}");
    }

    #[test]
    fn bounds_report_at_the_value() {
        let mut v = super::super::Validator::default();
        let zero = toml::Spanned::new(3..7, HumanDuration(Duration::ZERO));
        check_at_least(&zero, Duration::from_millis(100), "interval", &mut v);
        let ok = toml::Spanned::new(9..12, HumanDuration(Duration::from_secs(1)));
        check_at_least(&ok, Duration::from_millis(100), "interval", &mut v);
        check_at_most(&ok, Duration::from_secs(1), "interval", &mut v);
        let big = toml::Spanned::new(20..25, HumanDuration(Duration::from_secs(86_401)));
        check_at_most(&big, Duration::from_secs(86_400), "persistence", &mut v);
        let got: Vec<_> = v
            .diagnostics
            .iter()
            .map(|d| (d.span.clone(), d.message.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some(3..7),
                    "`interval` must be at least 100ms (got 0s)".to_string()
                ),
                (
                    Some(20..25),
                    "`persistence` must be at most 1d (got 1d1s)".to_string()
                ),
            ]
        );
    }

    proptest! {
        #[test]
        fn display_round_trips(ms in 0u64..10_000_000_000) {
            let d = HumanDuration(Duration::from_millis(ms));
            let back: HumanDuration = d.to_string().parse().unwrap();
            prop_assert_eq!(back, d);
        }

        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = s.parse::<HumanDuration>();
        }
    }
}
