//! Logs and traces. Logs go to stderr, filtered by `RUST_LOG` (default
//! `info`). Traces are exported over OTLP (HTTP/protobuf) when the standard
//! OpenTelemetry variables ask for it, and are off otherwise:
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turns
//!   export on;
//! - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off;
//! - `OTEL_SERVICE_NAME` names the service (default: `blockserve-<command>`);
//! - the SDK reads the rest (`OTEL_BSP_SCHEDULE_DELAY`, headers, timeouts,
//!   `OTEL_TRACES_SAMPLER`);
//! - the protocol is http/protobuf only; another `OTEL_EXPORTER_OTLP_PROTOCOL`
//!   gets a warning at start.
//!
//! A request's trace crosses the tiers as W3C `traceparent`. The router and
//! token decoder read and write it in gRPC metadata. On the link from a token
//! decoder to a block decoder, which many sessions share, it travels in each
//! session's `OpenBlocks` message.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn export_wanted() -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none") {
        return false;
    }
    env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

/// Set up logging and, when asked for, trace export as `service`.
pub fn init(service: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if export_wanted() && protocol.as_deref().is_some_and(|p| p != "http/protobuf") {
        eprintln!("OTLP protocol {:?} is not supported: traces go out as http/protobuf (port 4318 on a collector)", protocol.unwrap_or_default());
    }
    let otel = if export_wanted() {
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => {
                let name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_string());
                let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
                let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
                let tracer = provider.tracer("blockserve");
                let _ = PROVIDER.set(provider);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("OTLP trace export is off: {e}");
                None
            }
        }
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // RUST_LOG filters the logs only; traces take blockserve's own spans at
    // info and above whatever the log level.
    let ours = tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("blockserve") && *m.level() <= tracing::Level::INFO);
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel.map(|o| o.with_filter(ours))).try_init();
}

/// Export the spans still buffered (call before the process exits).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

/// `span`'s context as W3C trace-context headers (`traceparent`, and
/// `tracestate` when set). Empty when tracing is off.
pub fn headers(span: &tracing::Span) -> HashMap<String, String> {
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut out);
    out
}

/// Make the trace context in `headers` (if any) the parent of `span`.
pub fn set_parent(span: &tracing::Span, headers: &HashMap<String, String>) {
    if headers.get("traceparent").is_some_and(|v| !v.is_empty()) {
        let _ = span.set_parent(TraceContextPropagator::new().extract(headers));
    }
}

/// The trace-context headers of gRPC `metadata`.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    ["traceparent", "tracestate"].iter().filter_map(|k| Some((k.to_string(), metadata.get(*k)?.to_str().ok()?.to_string()))).collect()
}

/// Put `span`'s trace context into gRPC `metadata`.
pub fn to_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    for (k, v) in headers(span) {
        if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(), v.parse()) {
            metadata.insert(k, v);
        }
    }
}
