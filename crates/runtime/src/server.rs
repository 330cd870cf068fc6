//! Serving a tonic router with `grpc.health.v1`, server reflection and graceful
//! shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::server::{Router, TcpIncoming};
use tower::layer::util::{Identity, Stack};

use crate::coalesce::Coalesce;
use crate::guard::{GuardLayer, HTTP2_MAX_HEADER_LIST};
use crate::tls::{ServerTls, ServerTlsArgs};

/// Default of `--worker-threads` for the block decoder (the token decoder's
/// and the router's are their own).
pub const DEFAULT_WORKER_THREADS: u16 = 4;

/// The multi-threaded runtime a tier runs on, with `worker_threads` threads;
/// `critical` names threads that ask for the engine's priority (see
/// [`crate::thread::make_critical`]).
pub fn runtime(worker_threads: u16, critical: Option<&'static str>) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1) as usize)
        .enable_all()
        .on_thread_start(move || {
            if let Some(name) = critical {
                crate::thread::make_critical(name);
            }
        })
        .build()
        .expect("tokio runtime")
}

/// A tonic server with the per-call checks of [`crate::guard`].
pub type Server = tonic::transport::Server<Stack<GuardLayer, Identity>>;

/// The server every tier builds its services on: TCP_NODELAY, header lists up
/// to [`HTTP2_MAX_HEADER_LIST`] (an oversized one fails its own call, not the
/// connection) and the guard layer.
pub fn builder() -> Server {
    tonic::transport::Server::builder().tcp_nodelay(true).http2_max_header_list_size(HTTP2_MAX_HEADER_LIST).layer(GuardLayer)
}

/// Reflection lists what the tier serves: its own services, health and
/// reflection itself. grpcurl up to 1.8 and grpcio-reflection's client speak
/// v1alpha only; newer tools speak v1: both are served.
fn reflection(service_names: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(blockserve_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // Each version's service describes both (the builder adds only its own).
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    let served = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
    for name in served.iter().chain(service_names) {
        b = b.with_service_name(*name);
    }
    b
}

/// Flags every service has.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (host:port; port 0 picks a free one).
    #[arg(long, env = "BLOCKSERVE_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address other tiers dial to reach this one (default: the listen address).
    #[arg(long, env = "BLOCKSERVE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds to finish in-flight work after SIGTERM before exiting.
    #[arg(long, env = "BLOCKSERVE_GRACE_PERIOD_S", default_value_t = 30)]
    pub grace_period_s: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port; port 0
    /// picks a free one). Off when not given.
    #[arg(long, env = "BLOCKSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds an instance stays registered without renewing its lease.
    #[arg(long, env = "BLOCKSERVE_LEASE_TTL_S", default_value_t = 6)]
    pub lease_ttl_s: u64,
    /// Threads of the async runtime that serves calls and runs sessions
    /// (default: 2 for a token decoder or router, 4 for a block decoder). A
    /// few busy threads hand work to each other far more cheaply than many
    /// that keep parking and waking: at 750-800k tokens/s on two H200s, 4
    /// threads instead of one per core took the token decoder from 12.1 to 3.3
    /// us of CPU per token and the router from 4.7 to 2.5; 2 threads took the
    /// token decoder to 2.9 at the same throughput. At 1.27M tokens/s the
    /// router used 1.30 us per token with 2 threads, 1.9 with 4 and 2.6 with 8
    /// (docs/performance.md). A router that needs more cores is better
    /// scaled out (it is stateless) than given more threads.
    #[arg(long, env = "BLOCKSERVE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
}

impl ServeArgs {
    /// Defaults for a tier that `blockserve up` runs in process.
    pub fn local(listen: SocketAddr) -> Self {
        Self { listen, advertise: None, grace_period_s: 10, metrics_listen: None, lease_ttl_s: 6, worker_threads: None, tls: Default::default() }
    }

    /// Bind the listener and load the TLS files (failing early when they are
    /// unusable). The advertised address is https:// when TLS is on.
    pub async fn bind(&self) -> anyhow::Result<Listening> {
        let tls = ServerTls::from_args(&self.tls)?;
        let listener = tokio::net::TcpListener::bind(self.listen).await?;
        let bound = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let address = self.advertise.clone().unwrap_or_else(|| format!("{scheme}://{bound}"));
        Ok(Listening { listener, address, tls })
    }
}

/// A bound endpoint, ready for [`serve`].
pub struct Listening {
    pub listener: tokio::net::TcpListener,
    /// The address other tiers and clients dial.
    pub address: String,
    pub tls: Option<std::sync::Arc<ServerTls>>,
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A stop switch that SIGTERM/SIGINT flips (start draining).
pub fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining");
        let _ = tx.send(true);
    });
    rx
}

/// Entry point of a standalone service process: logging, the store from flags,
/// stop on SIGTERM/SIGINT, then `run` until it returns.
pub async fn run_process<F, Fut>(store: &crate::store::StoreArgs, run: F) -> anyhow::Result<()>
where
    F: FnOnce(std::sync::Arc<dyn blockserve_store::SessionStore>, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    crate::init_tracing();
    let store = store.connect().await?;
    run(store, stop_on_signal()).await
}

/// Add health and reflection to `router` and serve on `listener` until `stop` is
/// true; then stop accepting and give in-flight calls `grace` to finish.
///
/// `idle`, when given, says whether the tier has no work in flight: after
/// `stop` the server returns as soon as it does, whatever calls are still
/// open. (A block decoder's links to token decoders are calls that stay open
/// while their token decoders live; with no session on them nothing is lost.)
pub async fn serve(
    router: Router<Stack<GuardLayer, Identity>>,
    service_names: &[&str],
    listening: Listening,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    idle: Option<Box<dyn Fn() -> bool + Send>>,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in service_names {
        reporter.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let router = router.add_service(health).add_service(reflection(service_names).build_v1()?).add_service(reflection(service_names).build_v1alpha()?);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop2 = stop.clone();
    let stopped = async move {
        let _ = stop2.wait_for(|s| *s).await;
        let _ = drained_tx.send(());
    };
    // Every connection gathers a burst of responses into one write (coalesce.rs).
    let server = match listening.tls {
        Some(tls) => {
            let incoming = crate::tls::incoming(listening.listener, tls).map(|c| c.map(Coalesce::new));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        // tonic applies its tcp_nodelay setting only to listeners it binds itself.
        None => {
            let incoming = TcpIncoming::from(listening.listener).with_nodelay(Some(true)).map(|c| c.map(Coalesce::new));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    let _ = stop.wait_for(|s| *s).await;
    let _ = drained_rx.await;
    for name in service_names {
        reporter.set_service_status(*name, tonic_health::ServingStatus::NotServing).await;
    }
    let idle = async move {
        match idle {
            Some(idle) => {
                while !idle() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let abort = server.abort_handle();
    tokio::select! {
        r = tokio::time::timeout(grace, server) => match r {
            Ok(r) => r??,
            Err(_) => tracing::warn!("grace period over; exiting with calls in flight"),
        },
        _ = idle => {
            tracing::info!("no work in flight; exiting without waiting for idle calls");
            abort.abort();
        }
    }
    Ok(())
}
