//! How the router admits and places sessions, and how an idle tier stops:
//! - a client-chosen session id attaches only to the same request;
//! - sessions started one after another alternate between equally loaded
//!   token decoders;
//! - a block decoder with no session exits at once on SIGTERM, although
//!   token decoders keep their links to it open.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use common::{collect, demo_model, ids_request, Cluster};

fn greedy(n: u32) -> GenerationParameters {
    GenerationParameters { max_new_tokens: Some(n), ignore_eos: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reused_session_id_attaches_only_to_the_same_request_and_sessions_alternate_between_token_decoders() {
    let mut cluster = Cluster::start(&demo_model(), &[("block-decoder", 1, &[]), ("token-decoder", 2, &[]), ("router", 1, &[])]).await;
    let mut c = GenerationClient::connect(cluster.routers()[0].clone()).await.unwrap();

    // The same request under the same id attaches to the session (its output
    // from the start); another prompt or other parameters are refused.
    let first = GenerateRequest { session_id: "chosen-1".into(), ..ids_request(vec![5, 6, 7], greedy(12)) };
    let (_, tokens, _) = collect(c.generate(first.clone()).await.unwrap().into_inner()).await.unwrap();
    let mut again = c.generate(first.clone()).await.unwrap().into_inner();
    let started = again.message().await.unwrap().unwrap();
    assert_eq!(started.event, Some(generate_response::Event::Started(Started { prompt_tokens: 3, attached: true })));
    let (_, replay, _) = collect(again).await.unwrap();
    assert_eq!(replay, tokens);
    let other_prompt = GenerateRequest { session_id: "chosen-1".into(), ..ids_request(vec![9, 9], greedy(12)) };
    let e = c.generate(other_prompt).await.map(|_| ()).unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::AlreadyExists,
            "session_id \"chosen-1\" is taken by another request (its prompt differs); choose another id, or send the same request to attach to it"
        )
    );
    let other_params = GenerateRequest { session_id: "chosen-1".into(), ..ids_request(vec![5, 6, 7], greedy(13)) };
    let e = c.generate_unary(other_params).await.map(|_| ()).unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::AlreadyExists,
            "session_id \"chosen-1\" is taken by another request (its parameters differ); choose another id, or send the same request to attach to it"
        )
    );
    // Defaults filled in or not, it is the same request.
    let explicit = GenerationParameters { temperature: Some(0.0), top_p: Some(1.0), seed: Some(0), ..greedy(12) };
    let same = GenerateRequest { session_id: "chosen-1".into(), ..ids_request(vec![5, 6, 7], explicit) };
    assert_eq!(c.generate_unary(same).await.unwrap().into_inner().token_ids, tokens);

    // Eight sessions one after another: each starts once the last has ended,
    // so both token decoders are idle every time; they take turns.
    let store = cluster.store().await;
    let mut placed = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..8 {
        let id = c.generate_unary(ids_request(vec![1, 2, i], greedy(4))).await.unwrap().into_inner().session_id;
        let td = blockserve_store::SessionStore::session(&store, &id).await.unwrap().unwrap().assignment.token_decoder;
        *placed.entry(td).or_default() += 1;
    }
    assert_eq!(placed.values().copied().collect::<Vec<_>>(), vec![4, 4], "{placed:?}");

    // SIGTERM to the block decoder with no session open: it exits at once
    // (its grace period is 30 s), although both token decoders hold links.
    let i = cluster.of("block-decoder")[0];
    let bd = &mut cluster.procs[i];
    let child = bd.child.as_mut().unwrap();
    assert!(Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap().success());
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "an idle block decoder still runs 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    eprintln!("idle block decoder exited {:.0} ms after SIGTERM", start.elapsed().as_secs_f64() * 1e3);
}
