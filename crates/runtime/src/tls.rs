//! Transport security: TLS (rustls) on every gRPC endpoint, optional client
//! certificates (mutual TLS between tiers), and the client side that dials
//! other tiers at `https://` addresses.
//!
//! Certificates rotate without a restart: both sides look at the files' size
//! and modification time before each new connection and read them again when
//! they changed. A change that does not parse (a half-written file, a key that
//! does not match) is logged and the previous certificate stays in use.
//! Established connections keep the certificate they were opened with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;

/// Server-side TLS flags (every service).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain (leaf first) to serve TLS with; the endpoint then
    /// takes only TLS and advertises an https:// address. Read again when the
    /// file changes, so a rotated certificate needs no restart.
    #[arg(long, env = "BLOCKSERVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "BLOCKSERVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one of
    /// them (mutual TLS), others are refused during the handshake.
    #[arg(long, env = "BLOCKSERVE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Client-side TLS flags: how this process dials other tiers (and how
/// `blockserve client` dials a router) at https:// addresses.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DialTlsArgs {
    /// PEM CA certificates to trust for https:// peers (default: the system's
    /// root certificates).
    #[arg(long, env = "BLOCKSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to present to peers that require one (mutual TLS).
    #[arg(long, env = "BLOCKSERVE_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, env = "BLOCKSERVE_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Name to check peers' certificates against instead of the host of the
    /// address they registered (e.g. one certificate for every pod of a
    /// deployment whose instances register their pod IPs).
    #[arg(long, env = "BLOCKSERVE_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

/// Size and modification time of each file: a change means "read them again".
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files.iter().map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("{}: no PEM private key in it", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(store)
}

/// A file-backed value that is read again when its files change; `load`
/// failures after the first keep the last good value.
struct Reloading<T> {
    files: Vec<PathBuf>,
    what: &'static str,
    load: fn(&[PathBuf]) -> Result<T>,
    state: Mutex<(Stamp, T, u64)>,
}

impl<T: Clone> Reloading<T> {
    fn new(files: Vec<PathBuf>, what: &'static str, load: fn(&[PathBuf]) -> Result<T>) -> Result<Self> {
        let s = stamp(&files);
        let value = load(&files)?;
        Ok(Self { files, what, load, state: Mutex::new((s, value, 0)) })
    }

    /// The state, after reading the files again if they changed.
    fn refresh(&self) -> std::sync::MutexGuard<'_, (Stamp, T, u64)> {
        let now = stamp(&self.files);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now != st.0 {
            // Remember the stamp either way: a bad file is reported once, not
            // on every connection, and read again when it next changes.
            st.0 = now;
            match (self.load)(&self.files) {
                Ok(v) => {
                    st.1 = v;
                    st.2 += 1;
                    tracing::info!(files = ?self.files, "{} reloaded", self.what);
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "{} changed but cannot be used; keeping the previous one", self.what),
            }
        }
        st
    }

    /// The current value and its generation (bumped by every reload).
    fn get(&self) -> (T, u64) {
        let st = self.refresh();
        (st.1.clone(), st.2)
    }
}

/// The server side: a rustls configuration that follows its files.
pub struct ServerTls(Reloading<Arc<ServerConfig>>);

fn server_config(files: &[PathBuf]) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match files.get(2) {
        Some(ca) => builder.with_client_cert_verifier(WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider).build()?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&files[0])?, key(&files[1])?)
        .with_context(|| format!("{} and {} do not make a usable certificate and key", files[0].display(), files[1].display()))?;
    // h2 for gRPC; http/1.1 too for the router's HTTP API (curl and the
    // OpenAI SDKs speak it), on a port of its own.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl ServerTls {
    /// `None` without --tls-cert; an error when the files are not usable.
    pub fn from_args(a: &ServerTlsArgs) -> Result<Option<Arc<Self>>> {
        let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else { return Ok(None) };
        let mut files = vec![cert.clone(), key.clone()];
        files.extend(a.tls_client_ca.clone());
        Ok(Some(Arc::new(Self(Reloading::new(files, "TLS certificate", server_config)?))))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.get().0
    }
}

/// Handshakes in progress at once; beyond it, accepting waits (the kernel's
/// backlog queues new connections) so a flood of slow handshakes is bounded.
const MAX_HANDSHAKES: usize = 1024;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept connections on `listener` and hand out those that complete a TLS
/// handshake. Handshakes run concurrently so one slow client cannot stall the
/// others; failed ones (untrusted or missing client certificate, plain-text
/// clients) are logged at debug level and closed.
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => p.expect("never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
                drop(permit);
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How this process dials other instances: plain for http://, TLS with the
/// configured roots and client certificate for https://.
#[derive(Default)]
pub struct Dialer {
    files: Option<Reloading<ClientTlsConfig>>,
    server_name: Option<String>,
}

fn client_config(files: &[PathBuf]) -> Result<ClientTlsConfig> {
    let mut c = ClientTlsConfig::new();
    c = match files.first().filter(|f| !f.as_os_str().is_empty()) {
        Some(ca) => {
            roots(ca)?; // check it here: tonic reports a bad CA only at connect
            c.ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        }
        None => c.with_native_roots(),
    };
    if let [_, cert, key] = files {
        certs(cert)?;
        self::key(key)?;
        c = c.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
    }
    Ok(c)
}

impl Dialer {
    pub fn from_args(a: &DialTlsArgs) -> Result<Self> {
        let server_name = a.tls_server_name.clone();
        if a.tls_ca.is_none() && a.tls_client_cert.is_none() {
            return Ok(Self { files: None, server_name });
        }
        // files[0] is the CA (empty: the system's roots), then cert and key.
        let mut files = vec![a.tls_ca.clone().unwrap_or_default()];
        if let (Some(c), Some(k)) = (&a.tls_client_cert, &a.tls_client_key) {
            files.extend([c.clone(), k.clone()]);
        }
        Ok(Self { files: Some(Reloading::new(files, "client TLS certificate", client_config)?), server_name })
    }

    /// Generation of the client TLS files: changes when they were reloaded,
    /// so cached channels know to reconnect with the new ones.
    pub fn generation(&self) -> u64 {
        self.files.as_ref().map_or(0, |r| r.refresh().2)
    }

    /// An endpoint for `address` (`http://` or `https://host:port`).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, Status> {
        let e = Endpoint::from_shared(address.to_string()).map_err(|e| Status::invalid_argument(format!("instance address {address:?}: {e}")))?;
        if !address.starts_with("https://") {
            return Ok(e);
        }
        let mut tls = match &self.files {
            Some(r) => r.get().0,
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        e.tls_config(tls).map_err(|e| Status::failed_precondition(format!("TLS for {address}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn self_signed(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (write(dir, &format!("{tag}.pem"), &c.cert.pem()), write(dir, &format!("{tag}.key"), &c.signing_key.serialize_pem()))
    }

    #[test]
    fn a_changed_certificate_is_reloaded_and_a_broken_one_keeps_the_old() {
        let dir = std::env::temp_dir().join(format!("blockserve-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed(&dir, "a");
        let args = ServerTlsArgs { tls_cert: Some(cert.clone()), tls_key: Some(key.clone()), tls_client_ca: None };
        let tls = ServerTls::from_args(&args).unwrap().unwrap();
        let first = tls.config();
        assert!(Arc::ptr_eq(&first, &tls.config()), "unchanged files are not read again");
        assert_eq!(first.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);

        // A half-written certificate: the old configuration stays.
        write(&dir, "a.pem", "-----BEGIN CERTIFICATE-----\nMIIB");
        assert!(Arc::ptr_eq(&first, &tls.config()));

        // A new pair: served from the next connection on.
        let (c2, k2) = self_signed(&dir, "b");
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        assert!(!Arc::ptr_eq(&first, &tls.config()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unusable_files_are_refused_at_start_with_the_file_named() {
        let dir = std::env::temp_dir().join(format!("blockserve-tls-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, _) = self_signed(&dir, "a");
        let (_, other_key) = self_signed(&dir, "b");
        let not_pem = write(&dir, "x.pem", "hello");
        let e = |a: ServerTlsArgs| format!("{:#}", ServerTls::from_args(&a).err().unwrap());
        let msg = e(ServerTlsArgs { tls_cert: Some(not_pem.clone()), tls_key: Some(other_key.clone()), tls_client_ca: None });
        assert!(msg.contains("x.pem: no certificate in it"), "{msg}");
        let msg = e(ServerTlsArgs { tls_cert: Some(cert.clone()), tls_key: Some(other_key.clone()), tls_client_ca: None });
        assert!(msg.contains("do not make a usable certificate and key"), "{msg}");
        let msg = e(ServerTlsArgs { tls_cert: Some(cert.clone()), tls_key: Some(not_pem.clone()), tls_client_ca: None });
        assert!(msg.contains("x.pem: no PEM private key in it"), "{msg}");
        let msg = format!("{:#}", Dialer::from_args(&DialTlsArgs { tls_ca: Some(dir.join("missing.pem")), ..Default::default() }).err().unwrap());
        assert!(msg.contains("missing.pem"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
