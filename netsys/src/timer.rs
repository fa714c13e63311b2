//! The deadline sleep of the drivers' timer loops.
//!
//! Every driver runs its core the same way: ask `poll_timeout()`, sleep until that instant
//! (or forever when there is none) inside a `select!` with the I/O, then compare the
//! deadline with the clock itself before calling `handle_timeout` (quinn's rule: a timer
//! that fires early or late must not decide). This is the sleep half; the clock read stays
//! in each driver (see the clippy.toml ban on `Instant::now`).

use std::time::Instant;

/// Sleeps until `deadline`, or forever when there is none (the `select!` then waits for its
/// other branches only).
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_at_the_deadline_and_never_without_one() {
        #[allow(clippy::disallowed_methods)] // the test's one clock read
        let start = Instant::now();
        sleep_until(Some(start + Duration::from_millis(30))).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        let none = tokio::time::timeout(Duration::from_millis(50), sleep_until(None)).await;
        assert!(
            none.is_err(),
            "no deadline sleeps until something else wakes the loop"
        );
    }
}
