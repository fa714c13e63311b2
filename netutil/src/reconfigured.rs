//! The one answer every reconfigure gives: the new settings run now, or the unit must be
//! restarted to take them (and why, in words an operator reads in the reload reply).
//!
//! A refusal that leaves the old settings running is an error of the caller's own type, not a
//! variant here: `Reconfigured` only says how the accepted settings take effect.

use std::borrow::Cow;

/// How an accepted reconfiguration takes effect.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a NeedsRestart outcome has not been applied until the caller restarts the unit"]
pub enum Reconfigured {
    /// Applied to the running unit; its flows, sessions and state carry on.
    Live,
    /// Cannot be applied in place (an identity, an address or a socket changes); the caller
    /// stops the unit and starts it with the new settings.
    NeedsRestart(Cow<'static, str>),
}

impl Reconfigured {
    /// A restart outcome with its reason.
    pub fn restart(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::NeedsRestart(reason.into())
    }

    /// True when the new settings already run.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Live)
    }

    /// Combines two outcomes of one unit: live only when both are, else the first reason.
    pub fn and(self, other: Self) -> Self {
        match self {
            Self::Live => other,
            restart => restart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn and_keeps_the_first_restart_reason() {
        assert_eq!(
            Reconfigured::Live.and(Reconfigured::Live),
            Reconfigured::Live
        );
        assert_eq!(
            Reconfigured::restart("vrid").and(Reconfigured::restart("mtu")),
            Reconfigured::restart("vrid")
        );
        assert_eq!(
            Reconfigured::Live.and(Reconfigured::restart("mtu")),
            Reconfigured::restart("mtu")
        );
        assert!(!Reconfigured::restart("x").is_live());
    }
}
