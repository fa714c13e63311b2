//! One thread per SSH connection, as OpenSSH has one process per connection.
//!
//! A connection's session task (russh's event loop: encryption, framing, window accounting)
//! and the copy loops of the channels it carries run on the same single-threaded runtime, so
//! handing a chunk from a copy loop to the session is a local wake-up instead of a cross-core
//! one, and the session never waits for a worker thread to be scheduled. With `connections =
//! N`, N threads encrypt in parallel.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A thread running a current-thread tokio runtime until told to stop.
pub(crate) struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub(crate) fn spawn(name: String) -> std::io::Result<Worker> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            });
            // Dropping the runtime here, outside any async context, cancels the tasks left
            // on it (closing their sockets).
        })?;
        Ok(Worker {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the runtime and waits for its thread without blocking the caller's runtime.
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A client dropped without stop(): let the thread end by itself.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
