//! One pattern for "why was this packet dropped, and how often": [`drop_reasons!`] declares
//! a closed enum of reasons with stable snake_case names, and [`DropCounters`] keeps one
//! counter per reason in a fixed array indexed by the enum's discriminant.
//!
//! Invariants: the generated enum is fieldless with implicit discriminants `0..COUNT` in
//! declaration order, so `reason as usize` is always a valid index into the counters; names
//! are unique per enum (they become JSON keys and Prometheus `reason` labels).
//!
//! [`drop_reasons!`]: crate::drop_reasons

use core::fmt;

/// A closed set of drop reasons; implemented by [`drop_reasons!`](crate::drop_reasons).
pub trait Reason: Copy + Eq + fmt::Debug + Send + Sync + 'static {
    /// Every reason, in counter order (the position of a reason is its discriminant).
    const ALL: &'static [Self];
    /// The counter storage, `[u64; ALL.len()]`.
    type Counts: AsRef<[u64]> + AsMut<[u64]> + Clone + Eq + fmt::Debug + Send + Sync + 'static;
    /// All counters at zero.
    fn zeroed() -> Self::Counts;
    /// The reason's position in [`Reason::ALL`].
    fn index(self) -> usize;
    /// The stable snake_case name (JSON key, metric label).
    fn as_str(self) -> &'static str;
}

/// Declares a drop-reason enum: the enum itself (fieldless, `Debug, Clone, Copy, PartialEq,
/// Eq, Hash`), `ALL`, `COUNT`, `as_str`, `Display` and the [`Reason`] impl that
/// [`DropCounters`] needs. Each variant is written `Variant => "snake_name",`.
///
/// ```
/// netutil::drop_reasons! {
///     /// Why a toy protocol drops a packet.
///     pub enum ToyDrop {
///         /// Shorter than a header.
///         Truncated => "truncated",
///         /// Version other than 1.
///         BadVersion => "bad_version",
///     }
/// }
/// let mut drops = netutil::DropCounters::<ToyDrop>::default();
/// drops.count(ToyDrop::BadVersion);
/// assert_eq!(drops.get(ToyDrop::BadVersion), 1);
/// assert_eq!(ToyDrop::COUNT, 2);
/// assert_eq!(ToyDrop::Truncated.to_string(), "truncated");
/// ```
#[macro_export]
macro_rules! drop_reasons {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// How many reasons there are.
            $vis const COUNT: usize = [$($text,)+].len();

            /// Every reason, in counter order.
            $vis const ALL: [Self; Self::COUNT] = [$(Self::$variant,)+];

            /// The stable snake_case name, used as JSON key and metric label.
            #[must_use]
            $vis const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::Reason for $name {
            const ALL: &'static [Self] = &<$name>::ALL;
            type Counts = [u64; <$name>::COUNT];

            fn zeroed() -> Self::Counts {
                [0; <$name>::COUNT]
            }

            fn index(self) -> usize {
                self as usize
            }

            fn as_str(self) -> &'static str {
                <$name>::as_str(self)
            }
        }
    };
}

/// One counter per reason of `R`, indexed by discriminant (no search per drop).
///
/// With the `serde` feature it serialises as a map from reason name to count, every reason
/// present; deserialising ignores names it does not know (a newer daemon's reasons).
pub struct DropCounters<R: Reason> {
    counts: R::Counts,
}

impl<R: Reason> DropCounters<R> {
    /// Counts one drop for `reason`.
    pub fn count(&mut self, reason: R) {
        self.add(reason, 1);
    }

    /// Counts `n` drops for `reason`.
    pub fn add(&mut self, reason: R, n: u64) {
        if let Some(c) = self.counts.as_mut().get_mut(reason.index()) {
            *c = c.saturating_add(n);
        }
    }

    /// Drops counted for `reason`.
    #[must_use]
    pub fn get(&self, reason: R) -> u64 {
        self.counts
            .as_ref()
            .get(reason.index())
            .copied()
            .unwrap_or(0)
    }

    /// All drops, whatever the reason.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.as_ref().iter().sum()
    }

    /// `(reason, count)` for every reason, in counter order.
    pub fn iter(&self) -> impl Iterator<Item = (R, u64)> + '_ {
        R::ALL.iter().map(|r| (*r, self.get(*r)))
    }
}

impl<R: Reason> Default for DropCounters<R> {
    fn default() -> Self {
        Self {
            counts: R::zeroed(),
        }
    }
}

impl<R: Reason> Clone for DropCounters<R> {
    fn clone(&self) -> Self {
        Self {
            counts: self.counts.clone(),
        }
    }
}

impl<R: Reason> PartialEq for DropCounters<R> {
    fn eq(&self, other: &Self) -> bool {
        self.counts == other.counts
    }
}

impl<R: Reason> Eq for DropCounters<R> {}

impl<R: Reason> fmt::Debug for DropCounters<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(r, n)| (r.as_str(), n)))
            .finish()
    }
}

#[cfg(feature = "serde")]
impl<R: Reason> serde::Serialize for DropCounters<R> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter().map(|(r, n)| (r.as_str(), n)))
    }
}

#[cfg(feature = "serde")]
impl<'de, R: Reason> serde::Deserialize<'de> for DropCounters<R> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<R>(core::marker::PhantomData<R>);

        impl<'de, R: Reason> serde::de::Visitor<'de> for Visitor<R> {
            type Value = DropCounters<R>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from drop reason to count")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = DropCounters::default();
                // Owned names: a reader or an escaped key cannot lend a `&str`.
                while let Some((name, n)) = map.next_entry::<String, u64>()? {
                    if let Some(r) = R::ALL.iter().find(|r| r.as_str() == name) {
                        out.add(*r, n);
                    }
                }
                Ok(out)
            }
        }

        deserializer.deserialize_map(Visitor(core::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::drop_reasons! {
        /// Test reasons.
        #[non_exhaustive]
        pub(crate) enum Why {
            /// First.
            Short => "short",
            /// Second.
            Long => "long",
            /// Third.
            Odd => "odd",
        }
    }

    #[test]
    fn counters_are_indexed_by_discriminant() {
        assert_eq!(Why::COUNT, 3);
        assert_eq!(Why::ALL, [Why::Short, Why::Long, Why::Odd]);
        for (i, r) in Why::ALL.iter().enumerate() {
            assert_eq!(Reason::index(*r), i);
        }
        let mut c = DropCounters::<Why>::default();
        c.count(Why::Odd);
        c.count(Why::Odd);
        c.add(Why::Short, 5);
        assert_eq!(c.get(Why::Odd), 2);
        assert_eq!(c.get(Why::Long), 0);
        assert_eq!(c.total(), 7);
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            [(Why::Short, 5), (Why::Long, 0), (Why::Odd, 2)]
        );
        assert_eq!(format!("{c:?}"), r#"{"short": 5, "long": 0, "odd": 2}"#);
        assert_eq!(Why::Long.to_string(), "long");
    }

    #[test]
    fn counters_saturate() {
        let mut c = DropCounters::<Why>::default();
        c.add(Why::Long, u64::MAX);
        c.count(Why::Long);
        assert_eq!(c.get(Why::Long), u64::MAX);
    }
}

#[cfg(all(test, feature = "serde"))]
mod serde_tests {
    use super::*;

    crate::drop_reasons! {
        /// Test reasons.
        pub(crate) enum Why {
            /// First.
            WrongKey => "wrong_key",
            /// Second.
            Other => "other",
        }
    }

    #[test]
    fn counters_serialise_as_a_map_by_name() {
        let mut c = DropCounters::<Why>::default();
        c.count(Why::WrongKey);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"wrong_key":1,"other":0}"#);
        let back: DropCounters<Why> =
            serde_json::from_str(r#"{"wrong_key":1,"from_the_future":9}"#).unwrap();
        assert_eq!(back, c);
        let read: DropCounters<Why> =
            serde_json::from_reader(r#"{"wrong_key":1}"#.as_bytes()).unwrap();
        assert_eq!(read, c);
    }
}
