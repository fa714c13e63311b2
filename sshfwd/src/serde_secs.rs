//! `Option<Duration>` status fields as whole seconds (`uptime_s`), the resolution an SSH
//! connection's uptime is shown in; sub-second parts are truncated.

use core::time::Duration;
use serde::{Deserialize, Deserializer, Serializer};

/// Serialises `d` as whole seconds, or `null`.
pub(crate) fn serialize<S: Serializer>(
    d: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => serializer.serialize_u64(d.as_secs()),
        None => serializer.serialize_none(),
    }
}

/// Reads whole seconds, or `null`.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    Option::<u64>::deserialize(deserializer).map(|v| v.map(Duration::from_secs))
}
