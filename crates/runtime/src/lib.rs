//! Plumbing shared by the three services.

pub mod busy;
pub mod channels;
pub mod codec;
pub mod lease;
pub mod model_args;
pub mod params;
pub mod server;
pub mod status;
pub mod store;

/// The next batch for a model thread: blocks for the first queued command, then
/// takes everything else already queued (so one iteration serves all waiting
/// sessions). `queued` counts commands sent but not yet taken. `None` once every
/// sender is gone.
pub fn next_batch<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, queued: &std::sync::atomic::AtomicU32) -> Option<Vec<T>> {
    let first = rx.blocking_recv()?;
    let mut batch = vec![first];
    while let Ok(c) = rx.try_recv() {
        batch.push(c);
    }
    queued.fetch_sub(batch.len() as u32, std::sync::atomic::Ordering::Relaxed);
    Some(batch)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
