//! Plumbing shared by the three services.

pub mod busy;
pub mod channels;
pub mod codec;
pub mod lease;
pub mod metrics;
pub mod model_args;
pub mod params;
pub mod server;
pub mod status;
pub mod store;
pub mod thread;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// HTTP/2 flow-control windows of the link between a token decoder and a block
/// decoder (both ends). One pass's contexts for thousands of sessions are
/// megabytes; with h2's 64 KiB default the sender would wait for a window
/// update every 64 KiB, on the critical path of every session.
pub const LINK_STREAM_WINDOW: u32 = 16 << 20;
pub const LINK_CONNECTION_WINDOW: u32 = 32 << 20;
