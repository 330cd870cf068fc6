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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
