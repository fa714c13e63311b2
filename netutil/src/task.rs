//! Watching a driver's long-lived tasks: a task that ends while its driver still runs
//! (a panic, an error, or a plain return) is recorded, so the daemon can log it, show the
//! part as `dead` and restart it instead of carrying on with a silently missing receive loop.
//!
//! Invariants: a [`TaskWatch`] records only the first unexpected end (the cause, not the
//! cascade); after [`TaskWatch::stopping`] no end is unexpected; a panic in a watched task
//! never propagates further than its own task.

use futures::FutureExt;
use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// Shared record of how a driver's tasks ended. Cheap to clone: clones share the record.
#[derive(Debug, Clone, Default)]
pub struct TaskWatch {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stopping: AtomicBool,
    first_death: Mutex<Option<String>>,
}

impl TaskWatch {
    /// A watch with nothing recorded.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the current tokio runtime under this watch. An `Err`, a panic or an
    /// `Ok` return before [`TaskWatch::stopping`] is recorded under `name`.
    pub fn spawn<F, E>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let ended = AssertUnwindSafe(task).catch_unwind().await;
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let why = match ended {
                Ok(Ok(())) => format!("{name} ended"),
                Ok(Err(e)) => format!("{name} failed: {e}"),
                Err(panic) => format!("{name} panicked: {}", panic_message(panic.as_ref())),
            };
            let mut first = inner
                .first_death
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            first.get_or_insert(why);
        })
    }

    /// Marks the driver as stopping: tasks ending from now on are ending on purpose.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// The first task that ended unexpectedly, with its cause; `None` while all run.
    #[must_use]
    pub fn dead(&self) -> Option<String> {
        self.inner
            .first_death
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-text panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_the_first_unexpected_end_only() {
        let watch = TaskWatch::new();
        let t = watch.spawn("receive", async { Err::<(), _>("socket closed") });
        t.await.expect("the wrapper itself never panics");
        let t = watch.spawn("transmit", async { Ok::<(), String>(()) });
        t.await.expect("the wrapper itself never panics");
        assert_eq!(
            watch.dead().as_deref(),
            Some("receive failed: socket closed")
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_and_named() {
        let watch = TaskWatch::new();
        let t = watch.spawn("coalescer", async {
            let v: Vec<u8> = Vec::new();
            let i = v.len() + 13;
            if i > 0 {
                panic!("index out of bounds: {i}");
            }
            Ok::<(), String>(())
        });
        t.await.expect("the panic stays inside the task");
        assert_eq!(
            watch.dead().as_deref(),
            Some("coalescer panicked: index out of bounds: 13")
        );
    }

    #[tokio::test]
    async fn ends_after_stopping_are_not_deaths() {
        let watch = TaskWatch::new();
        watch.stopping();
        let t = watch.spawn("receive", async { Ok::<(), String>(()) });
        t.await.expect("the wrapper itself never panics");
        assert_eq!(watch.dead(), None);
    }
}
