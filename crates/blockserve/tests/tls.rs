//! Transport security between real processes: every tier serves TLS, the
//! tiers require each other's client certificates (mutual TLS), and the
//! router's public API takes TLS plus a bearer token. Clients that are not
//! trusted (no certificate, one from another CA, plain text, a server they do
//! not trust, no token) are refused; a certificate replaced on disk is served
//! from the next connection on, without a restart. The block decoder's
//! certificate names no address, only a name the token decoder checks with
//! --tls-server-name.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const TOKEN: &str = "tls-test-token";

/// A certificate authority that writes its certificate and the leaves it
/// signs as PEM files under `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: &'static str,
}

impl Ca {
    fn new(dir: &Path, name: &'static str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, format!("blockserve test CA {name}"));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), issuer.pem()).unwrap();
        Self { issuer, dir: dir.to_path_buf(), name }
    }

    fn pem_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    fn pem(&self) -> Certificate {
        Certificate::from_pem(self.issuer.pem())
    }

    /// A leaf for 127.0.0.1, usable as server and client certificate:
    /// (certificate PEM, key PEM).
    fn leaf(&self, cn: &str) -> (String, String) {
        self.leaf_for(cn, &["127.0.0.1", "localhost"])
    }

    /// A leaf for the names (and IP addresses) `sans`.
    fn leaf_for(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `leaf_for(name, sans)` written to `<name>.crt` / `<name>.key`.
    fn leaf_files(&self, name: &str, sans: &[&str]) -> (String, String) {
        let (c, k) = self.leaf_for(name, sans);
        let (cp, kp) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cp, c).unwrap();
        std::fs::write(&kp, k).unwrap();
        (cp.to_str().unwrap().to_string(), kp.to_str().unwrap().to_string())
    }
}

/// The name on the block decoder's certificate (it has no IP address: the
/// token decoder dials it with --tls-server-name, as pods that register their
/// IPs would).
const INTERNAL_NAME: &str = "blockserve-internal";

/// A client channel to `port` over TLS trusting `ca`, presenting `identity`
/// (checking the server's certificate against `name`, default 127.0.0.1).
async fn tls_channel_named(port: u16, ca: &Ca, identity: Option<(String, String)>, name: Option<&str>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(ca.pem());
    if let Some(n) = name {
        tls = tls.domain_name(n);
    }
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap().connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| blockserve_runtime::status::source_chain(&e))
}

async fn tls_channel(port: u16, ca: &Ca, identity: Option<(String, String)>) -> Result<Channel, String> {
    tls_channel_named(port, ca, identity, None).await
}

/// The health check's answer over `channel`: Ok(()) when SERVING.
async fn health(channel: Result<Channel, String>) -> Result<(), String> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel?);
    let r = c.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    Ok(())
}

fn request(prompt: Vec<u32>, n: u32, token: Option<&str>) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(ids_request(prompt, GenerationParameters { max_new_tokens: Some(n), temperature: Some(0.0), ..Default::default() }));
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiers_talk_mutual_tls_untrusted_clients_are_refused_and_certificates_reload() {
    let dir = blockserve_testkit::TempDir::new("tls-test");
    let ca = Ca::new(&dir, "cluster");
    let rogue = Ca::new(&dir, "rogue");
    let (tier_cert, tier_key) = ca.leaf_files("tier", &["127.0.0.1", "localhost"]);
    let (bd_cert, bd_key) = ca.leaf_files("block-decoder", &[INTERNAL_NAME]);
    let (router_cert, router_key) = ca.leaf_files("router", &["127.0.0.1", "localhost"]);
    let ca_pem = ca.pem_path();
    let ca_path = ca_pem.to_str().unwrap();

    // Internal tiers: TLS that requires a client certificate from the cluster CA.
    let mtls = ["--tls-cert", &tier_cert, "--tls-key", &tier_key, "--tls-client-ca", ca_path];
    let block_decoder = ["--tls-cert", &bd_cert, "--tls-key", &bd_key, "--tls-client-ca", ca_path];
    // Dialing: trust the cluster CA and present the tier certificate.
    let dial = ["--tls-ca", ca_path, "--tls-client-cert", &tier_cert, "--tls-client-key", &tier_key];
    let token_decoder: Vec<&str> = mtls.iter().chain(&dial).chain(&["--tls-server-name", INTERNAL_NAME]).copied().collect();
    let http_port = blockserve_testkit::free_port();
    let http_listen = format!("127.0.0.1:{http_port}");
    let router: Vec<&str> =
        ["--tls-cert", &router_cert, "--tls-key", &router_key, "--api-token", TOKEN, "--http-listen", &http_listen].iter().chain(&dial).copied().collect();
    let model = fixture_model();
    let cluster = Cluster::start(&model, &[("block-decoder", 1, &block_decoder), ("token-decoder", 1, &token_decoder), ("router", 1, &router)]).await;
    let port = |tier: &str| cluster.procs[cluster.of(tier)[0]].port;

    // Instances advertise https:// addresses.
    let store = cluster.store().await;
    use blockserve_store::{SessionStore, Tier};
    for tier in [Tier::BlockDecoder, Tier::TokenDecoder] {
        let addrs: Vec<String> = store.instances(tier).await.unwrap().into_iter().map(|i| i.address).collect();
        assert!(addrs.len() == 1 && addrs[0].starts_with("https://127.0.0.1:"), "{addrs:?}");
    }

    // A trusted client with the token: the whole path (router -> token
    // decoder -> block decoder, all TLS) gives the exact greedy output.
    let prompts = vec![vec![5, 6, 7], vec![100, 200, 300, 400, 9]];
    let want = greedy_reference(&model, &prompts, 12);
    let channel = tls_channel(port("router"), &ca, None).await.unwrap();
    let mut client = GenerationClient::new(channel.clone());
    for (p, w) in prompts.iter().zip(&want) {
        let (_, tokens, _) = collect(client.generate(request(p.clone(), 12, Some(TOKEN))).await.unwrap().into_inner()).await.unwrap();
        assert_eq!(&tokens, w);
    }

    // The HTTP API takes the same TLS and token (curl, HTTP/2 over ALPN and
    // HTTP/1.1), and gives the same tokens; plain HTTP to it gets nothing.
    let body = format!(r#"{{"prompt": {:?}, "max_tokens": 12, "temperature": 0}}"#, prompts[0]);
    let url = format!("https://127.0.0.1:{http_port}/v1/completions");
    for version in ["--http2", "--http1.1"] {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                version,
                "--cacert",
                ca_path,
                &url,
                "-H",
                &format!("authorization: Bearer {TOKEN}"),
                "-H",
                "content-type: application/json",
                "-d",
                &body,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{version}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{version}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        let ids: Vec<u32> = v["choices"][0]["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want[0], "{version}");
    }
    let plain = std::process::Command::new("curl").args(["-sS", "--max-time", "10", &format!("http://127.0.0.1:{http_port}/v1/models")]).output().unwrap();
    assert!(!plain.status.success(), "plain HTTP answered: {}", String::from_utf8_lossy(&plain.stdout));

    // No token, or a wrong one: UNAUTHENTICATED.
    for token in [None, Some("not-the-token")] {
        let e = client.generate(request(vec![1, 2, 3], 4, token)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e:?}");
    }

    // Plain text to a TLS endpoint: the server drops the connection during
    // the handshake (what the client reports varies: cancelled, unavailable
    // or an HTTP/2 error), and no call is answered.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", port("router"))).unwrap().connect_timeout(Duration::from_secs(5));
    let plain = plain.connect().await.map_err(|e| e.to_string());
    assert!(health(plain).await.is_err());

    // A client that does not trust the router's CA refuses it.
    let e = tls_channel(port("router"), &rogue, None).await.map(|_| ()).unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    // The internal tiers refuse clients without a certificate from the
    // cluster CA, and accept one with it. (With TLS 1.3 the server checks the
    // client's certificate after the client considers the handshake done, so
    // the client reports the refusal in varying ways: what counts is that no
    // call is answered.)
    for (tier, name) in [("token-decoder", None), ("block-decoder", Some(INTERNAL_NAME))] {
        let e = health(tls_channel_named(port(tier), &ca, None, name).await).await;
        assert!(e.is_err(), "{tier} answered a client without a certificate");
        let e = health(tls_channel_named(port(tier), &ca, Some(rogue.leaf("intruder")), name).await).await;
        assert!(e.is_err(), "{tier} answered a client with a certificate from another CA");
        health(tls_channel_named(port(tier), &ca, Some(ca.leaf("operator")), name).await).await.unwrap_or_else(|e| panic!("{tier}, trusted certificate: {e}"));
    }
    // The block decoder's certificate names no address: checked against
    // 127.0.0.1 it is refused (so the token decoder got through only by
    // --tls-server-name).
    let e = tls_channel(port("block-decoder"), &ca, Some(ca.leaf("operator"))).await.map(|_| ()).unwrap_err();
    assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");

    // Every tier answers the HTTP health check on its metrics port (the probe
    // for deployments whose gRPC port takes only TLS).
    for p in &cluster.procs {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", p.metrics_port)).unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("\r\n\r\nok\n"), "{}: {reply}", p.tier);
    }

    // The load generator reads ghz's TLS keys: a ghz config with `cacert`
    // and the token drives the router over TLS.
    let config = dir.join("ghz.json");
    let ghz = serde_json::json!({
        "call": "blockserve.v1.Generation.Generate", "host": format!("127.0.0.1:{}", port("router")), "cacert": ca_path,
        "metadata": {"authorization": format!("Bearer {TOKEN}")}, "total": 4, "concurrency": 2,
        "data": {"token_ids": {"ids": [5, 6, 7]}, "parameters": {"max_new_tokens": 8, "ignore_eos": true}}
    });
    std::fs::write(&config, ghz.to_string()).unwrap();
    let loadtest = blockserve_testkit::workspace_bin(env!("CARGO_BIN_EXE_blockserve"), "blockserve-loadtest");
    let out = std::process::Command::new(loadtest).args(["--config", config.to_str().unwrap(), "--format", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["statusCodeDistribution"].clone(), report["tokens"].clone()), (serde_json::json!({"OK": 4}), serde_json::json!(32)));

    // Rotation: the router's certificate is replaced by one from a new CA.
    // Connections opened from then on get the new one; no restart.
    let next = Ca::new(&dir, "next");
    let (c, k) = next.leaf("router-2");
    std::fs::write(&router_key, k).unwrap();
    std::fs::write(&router_cert, c).unwrap();
    let e = tls_channel(port("router"), &ca, None).await.map(|_| ()).unwrap_err();
    assert!(e.contains("UnknownIssuer"), "the old certificate is still served: {e}");
    let mut client2 = GenerationClient::new(tls_channel(port("router"), &next, None).await.unwrap());
    let (_, tokens, _) = collect(client2.generate(request(prompts[0].clone(), 12, Some(TOKEN))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(tokens, want[0]);
    // The connection opened before the rotation keeps working.
    let (_, tokens, _) = collect(client.generate(request(prompts[1].clone(), 12, Some(TOKEN))).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(tokens, want[1]);

    // A rotation to files that do not parse keeps the last good certificate.
    std::fs::write(&router_cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    health(tls_channel(port("router"), &next, None).await).await.unwrap();
    drop(cluster);
}
