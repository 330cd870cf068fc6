//! Plumbing shared by the three services.

pub mod busy;
pub mod channels;
pub mod coalesce;
pub mod guard;
pub mod lease;
pub mod metrics;
pub mod params;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod thread;
pub mod tls;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), and OTLP trace
/// export when the `OTEL_*` variables ask for it (see [`telemetry`]).
pub fn init_tracing() {
    telemetry::init("blockserve");
}

/// HTTP/2 flow-control windows of the link between a token decoder and a block
/// decoder (both ends). One pass's contexts for thousands of sessions are
/// megabytes; with h2's 64 KiB default the sender would wait for a window
/// update every 64 KiB, on the critical path of every session.
pub const LINK_STREAM_WINDOW: u32 = 16 << 20;
pub const LINK_CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame either end of a link accepts: a pass's contexts go in
/// a few frames instead of about a hundred of h2's default 16 KiB.
pub const LINK_MAX_FRAME: u32 = 1 << 20;
