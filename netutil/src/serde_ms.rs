//! `Duration` fields as whole milliseconds in serialised status (`#[serde(with =
//! "netutil::serde_ms")]`, or `netutil::serde_ms::option` for `Option<Duration>`), so a
//! status field named `…_ms` is a plain integer for `show --json` and the metrics endpoint.
//!
//! Sub-millisecond parts are truncated; values beyond `u64::MAX` ms saturate.

use core::time::Duration;
use serde::{Deserialize, Deserializer, Serializer};

/// Serialises `d` as whole milliseconds.
///
/// # Errors
/// Whatever the serializer returns.
pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads whole milliseconds.
///
/// # Errors
/// The value is not an unsigned integer.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

/// The same for `Option<Duration>` (`null` when absent).
pub mod option {
    use core::time::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `d` as whole milliseconds, or `null`.
    ///
    /// # Errors
    /// Whatever the serializer returns.
    pub fn serialize<S: Serializer>(
        d: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Reads whole milliseconds, or `null`.
    ///
    /// # Errors
    /// The value is neither `null` nor an unsigned integer.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(deserializer).map(|v| v.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use core::time::Duration;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Timed {
        #[serde(with = "crate::serde_ms")]
        interval_ms: Duration,
        #[serde(with = "crate::serde_ms::option")]
        down_for_ms: Option<Duration>,
    }

    #[test]
    fn durations_are_whole_milliseconds() {
        let t = Timed {
            interval_ms: Duration::from_micros(1_500_700),
            down_for_ms: None,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"interval_ms":1500,"down_for_ms":null}"#);
        let back: Timed = serde_json::from_str(r#"{"interval_ms":1500,"down_for_ms":20}"#).unwrap();
        assert_eq!(back.interval_ms, Duration::from_millis(1500));
        assert_eq!(back.down_for_ms, Some(Duration::from_millis(20)));
    }
}
