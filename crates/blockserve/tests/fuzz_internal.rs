//! Property tests of the internal messages (a bounded fuzz that runs in CI),
//! against real block-decoder and token-decoder processes with a real Redis:
//!
//! - link messages to the block decoder: arbitrary bytes decoded as `LinkUp`,
//!   and well-formed ones with hostile values (ids past the vocabulary,
//!   prompts that are not whole blocks, blocks with the wrong token count or
//!   index, keys nobody opened, repeated opens and closes);
//! - `Run` requests to the token decoder: hostile prompts, output to resume
//!   after, parameters, block-decoder addresses and session ids nobody owns;
//! - a hostile block decoder on the token decoder's link: contexts of the
//!   wrong size, dtype or row count, NaN and infinite values, keys nobody
//!   opened, wrong block indices, errors with any code (OK included) or an
//!   empty or huge message, and links that close, fail or go silent.
//!
//! Every case gets an answer (an error naming the session, a context, or a
//! stream that ends with a status or `finished`), none hangs, and both
//! processes stay up and serve a valid session afterwards.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::*;
use blockserve_store::SessionStore;
use blockserve_testkit::{metric_sum, scrape_metrics};
use common::*;
use proptest::prelude::*;
use prost::Message;

fn ids(max_len: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(prop_oneof![0u32..512, 0u32..u32::MAX], 0..max_len)
}

fn link_up() -> impl Strategy<Value = LinkUp> {
    let open = (0u64..6, ids(20), any::<u32>()).prop_map(|(key, prompt_ids, max_new_blocks)| OpenBlocks {
        key,
        session_id: format!("f{key}"),
        prompt_ids,
        max_new_blocks: max_new_blocks % 64,
        traceparent: String::new(),
    });
    let blocks = (prop::collection::vec(0u64..6, 0..4), prop::collection::vec(0u32..8, 0..4), ids(20)).prop_map(|(keys, indices, token_ids)| BlockBatch {
        keys,
        indices,
        token_ids,
    });
    let structured = (prop::collection::vec(open, 0..3), prop::option::of(blocks), prop::collection::vec(0u64..6, 0..3), any::<u32>())
        .prop_map(|(opens, blocks, closes, held_back)| LinkUp { opens, blocks, closes, held_back });
    let raw = prop::collection::vec(any::<u8>(), 0..64).prop_filter_map("decodes as LinkUp", |b| LinkUp::decode(&b[..]).ok());
    prop_oneof![4 => structured, 1 => raw]
}

fn run_request(bd: String) -> impl Strategy<Value = RunRequest> {
    let params = (prop::option::of(0u32..40), prop::option::of(-1.0f32..3.0), prop::option::of(-0.5f32..1.5), any::<bool>()).prop_map(
        |(max_new_tokens, temperature, top_p, ignore_eos)| GenerationParameters { max_new_tokens, temperature, top_p, ignore_eos, ..Default::default() },
    );
    let address = prop_oneof![Just(bd), Just("http://127.0.0.1:1".to_string()), Just("not a url".to_string())];
    // Trace contexts: none, a well-formed one, or garbage.
    let traceparent = prop_oneof![Just(String::new()), Just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()), ".{0,60}"];
    (ids(12), ids(9), params, address, any::<u64>(), 0u32..3, traceparent).prop_map(
        |(prompt_ids, generated_ids, parameters, block_decoder, epoch, max_migrations, traceparent)| RunRequest {
            session_id: format!("nobody-{epoch}"),
            prompt_ids,
            parameters: Some(parameters),
            block_decoder,
            eos_token_id: None,
            generated_ids,
            epoch,
            migrations: 0,
            max_migrations,
            traceparent,
        },
    )
}

/// Which key a hostile reply names: the session just opened, or any other.
#[derive(Debug, Clone)]
enum KeyPick {
    Opened,
    Other(u64),
}

/// Values of a well-sized context matrix.
#[derive(Debug, Clone)]
enum Fill {
    Zeros,
    Nan,
    Infinite,
    Random(u64),
}

#[derive(Debug, Clone)]
struct HostileContexts {
    extra_rows: i32,
    dim: u32,
    dtype: i32,
    extra_bytes: i32,
    fill: Fill,
}

/// One message down the link.
#[derive(Debug, Clone)]
struct Reply {
    key: KeyPick,
    block_index: Option<u32>,
    contexts: Option<HostileContexts>,
    errors: Vec<(KeyPick, i32, String)>,
}

/// What the hostile link does after its replies.
#[derive(Debug, Clone)]
enum Ending {
    Close,
    Fail(i32),
    Silent,
}

#[derive(Debug, Clone)]
struct Script {
    replies: Vec<Reply>,
    ending: Ending,
}

/// Hidden size of the fixture's block decoder: the context width.
const D: u32 = 64;

fn script() -> impl Strategy<Value = Script> {
    let key = prop_oneof![3 => Just(KeyPick::Opened), 1 => (0u64..1000).prop_map(KeyPick::Other)];
    let fill = prop_oneof![Just(Fill::Zeros), Just(Fill::Nan), Just(Fill::Infinite), any::<u64>().prop_map(Fill::Random)];
    let contexts = (
        prop_oneof![3 => Just(0), 1 => -1i32..3],
        prop_oneof![3 => Just(D), 1 => 0u32..200],
        prop_oneof![3 => Just(1), 1 => -1i32..6],
        prop_oneof![3 => Just(0), 1 => -9i32..9],
        fill,
    )
        .prop_map(|(extra_rows, dim, dtype, extra_bytes, fill)| HostileContexts { extra_rows, dim, dtype, extra_bytes, fill });
    let message = prop_oneof![Just(String::new()), "[a-z ]{1,20}", Just("x".repeat(100_000))];
    let errors = prop::collection::vec((key.clone(), -2i32..20, message), 0..2);
    let reply = (key, prop::option::of(0u32..4), prop::option::of(contexts), errors).prop_map(|(key, block_index, contexts, errors)| Reply {
        key,
        block_index,
        contexts,
        errors,
    });
    let ending = prop_oneof![Just(Ending::Close), (0i32..20).prop_map(Ending::Fail), Just(Ending::Silent)];
    (prop::collection::vec(reply, 0..4), ending).prop_map(|(replies, ending)| Script { replies, ending })
}

fn pick(k: &KeyPick, opened: u64) -> u64 {
    match k {
        KeyPick::Opened => opened,
        KeyPick::Other(k) => *k,
    }
}

fn message_for(r: &Reply, opened: u64, next_index: u32) -> LinkDown {
    let key = pick(&r.key, opened);
    let errors = r.errors.iter().map(|(k, code, message)| SessionError { key: pick(k, opened), code: *code, message: message.clone() }).collect();
    let Some(c) = &r.contexts else { return LinkDown { errors, ..Default::default() } };
    let rows = (1 + c.extra_rows).max(0) as u32;
    let width = match c.dtype {
        1 => 4,
        _ => 2,
    };
    let n = (rows as usize * c.dim as usize * width) as i64 + c.extra_bytes as i64;
    let data: Vec<u8> = match c.fill {
        Fill::Zeros => vec![0; n.max(0) as usize],
        Fill::Nan => f32::NAN.to_le_bytes().iter().copied().cycle().take(n.max(0) as usize).collect(),
        Fill::Infinite => f32::INFINITY.to_le_bytes().iter().copied().cycle().take(n.max(0) as usize).collect(),
        Fill::Random(seed) => (0..n.max(0) as u64).map(|i| (seed.wrapping_mul(i + 1) >> 7) as u8).collect(),
    };
    LinkDown {
        keys: vec![key],
        block_indices: vec![r.block_index.unwrap_or(next_index)],
        contexts: Some(Embeddings { data, dtype: c.dtype, dim: c.dim, rows }),
        errors,
        // A reuse count for a key it does not hold and one out of all
        // proportion, in lists of different lengths: ignored, or cut to the
        // prompt, never a failure.
        reused_keys: vec![key, key ^ 1],
        reused_blocks: vec![u32::MAX],
    }
}

/// A block decoder that answers every session it is asked to open with the
/// current script, then ends the link as the script says.
#[derive(Clone, Default)]
struct HostileBlockDecoder(Arc<Mutex<Option<Script>>>);

#[tonic::async_trait]
impl blockserve_proto::v1::block_decoder_server::BlockDecoder for HostileBlockDecoder {
    type LinkStream = tokio_stream::wrappers::ReceiverStream<Result<LinkDown, tonic::Status>>;

    async fn link(&self, req: tonic::Request<tonic::Streaming<LinkUp>>) -> Result<tonic::Response<Self::LinkStream>, tonic::Status> {
        let mut up = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let current = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = up.message().await {
                for open in m.opens {
                    let Some(script) = current.lock().unwrap().clone() else { continue };
                    for (i, r) in script.replies.iter().enumerate() {
                        let _ = tx.send(Ok(message_for(r, open.key, i as u32))).await;
                    }
                    match script.ending {
                        Ending::Close => return,
                        Ending::Fail(code) => {
                            let _ = tx.send(Err(tonic::Status::new(tonic::Code::from_i32(code), "hostile block decoder gives up"))).await;
                            return;
                        }
                        Ending::Silent => {}
                    }
                }
            }
        });
        Ok(tonic::Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn contexts(&self, _: tonic::Request<ContextsRequest>) -> Result<tonic::Response<ContextsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("hostile block decoder"))
    }
}

/// Record a session as a router would before it runs it (a session the store
/// does not know is fenced off at its first write).
async fn record(store: &blockserve_store::RedisStore, id: &str, td: &str, bd: &str) {
    use blockserve_store::{Assignment, SessionSpec};
    let spec = SessionSpec { id: id.into(), prompt_ids: vec![3, 1, 4, 1, 5], parameters: Default::default(), created_at_ms: 0 };
    let to = Assignment { token_decoder: td.into(), token_decoder_id: "fuzz".into(), block_decoder: bd.into() };
    assert!(store.create_session(&spec, &to).await.unwrap());
}

/// Run `req` on the token decoder and check it is answered within 30 s:
/// a refusal or a stream that ends with `finished` or a status, each with a
/// message. Returns the tokens streamed, or the status.
async fn run_answered(td: impl Into<String>, req: RunRequest) -> Result<Vec<u32>, tonic::Status> {
    let mut client = TokenDecoderClient::connect(td.into()).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut tokens = vec![];
        match client.run(req).await {
            Err(st) => {
                assert!(!st.message().is_empty(), "a refusal without a message: {st:?}");
                return Err(st);
            }
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(RunEvent { kind: Some(run_event::Kind::Finished(_)) })) => break,
                        Ok(Some(RunEvent { kind: Some(run_event::Kind::Tokens(c)) })) => tokens.extend(c.token_ids),
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("the stream ended without `finished` or a status"),
                        Err(st) => {
                            assert!(!st.message().is_empty(), "a status without a message: {st:?}");
                            assert!(st.message().len() < 2048, "a status message of {} bytes", st.message().len());
                            return Err(st);
                        }
                    }
                }
            }
        }
        Ok(tokens)
    })
    .await;
    answered.expect("no answer within 30 s")
}

/// Whatever comes down the link for a while (the block decoder answers only
/// what has an answer).
async fn drain(down: &mut tonic::Streaming<LinkDown>) {
    while let Ok(Some(Ok(Some(m)))) = tokio::time::timeout(Duration::from_millis(30), down.message()).await.map(Some) {
        for e in m.errors {
            assert!(!e.message.is_empty() && e.code != 0, "an error without a message or code: {e:?}");
        }
    }
}

#[test]
fn internal_messages_get_answers_and_never_take_a_tier_down() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // A 1 s block timeout: sessions a silent block decoder holds move on quickly.
    let cluster = rt.block_on(Cluster::start(&fixture_model(), &[("block-decoder", 1, &[]), ("token-decoder", 1, &["--block-timeout-s", "1"])]));
    let (bd, td) = (cluster.procs[0].address(), cluster.procs[1].address());
    let config = ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() };

    proptest!(config.clone(), |(messages in prop::collection::vec(link_up(), 1..6))| {
        rt.block_on(async {
            let mut client = BlockDecoderClient::connect(bd.clone()).await.unwrap();
            let (up, rx) = tokio::sync::mpsc::unbounded_channel::<LinkUp>();
            let mut down = client.link(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
            for m in messages {
                up.send(m).unwrap();
                drain(&mut down).await;
            }
            // Ending the link frees what it left open: the stream ends cleanly.
            drop(up);
            let end = tokio::time::timeout(Duration::from_secs(10), async { while down.message().await.unwrap().is_some() {} }).await;
            assert!(end.is_ok(), "the link did not end after its client closed it");
        });
    });

    proptest!(config.clone(), |(req in run_request(bd.clone()))| {
        rt.block_on(async {
            let _ = run_answered(td.clone(), req).await;
        });
    });

    // A hostile block decoder (not registered: sessions that lose it move to
    // the real one, which the registry offers).
    let hostile = HostileBlockDecoder::default();
    let hostile_address = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder().add_service(blockserve_proto::v1::block_decoder_server::BlockDecoderServer::new(hostile.clone()));
        tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        address
    });
    let store = rt.block_on(cluster.store());

    // What the fuzz found, pinned as regression cases.
    rt.block_on(async {
        let prompt = vec![3, 1, 4, 1, 5];
        let want = greedy_reference(&fixture_model(), std::slice::from_ref(&prompt), 200).remove(0);
        let run = |id: &str, bd: &str, n: u32| {
            let parameters = GenerationParameters { max_new_tokens: Some(n), temperature: Some(0.0), ignore_eos: true, ..Default::default() };
            RunRequest {
                session_id: id.into(),
                prompt_ids: prompt.clone(),
                parameters: Some(parameters),
                block_decoder: bd.into(),
                max_migrations: 2,
                ..Default::default()
            }
        };
        let set = |replies: Vec<Reply>, ending: Ending| *hostile.0.lock().unwrap() = Some(Script { replies, ending });
        let error_reply = |errors: Vec<(KeyPick, i32, String)>| Reply { key: KeyPick::Opened, block_index: None, contexts: None, errors };

        // 1. An error with code OK ends the session with INTERNAL (it used to
        //    end the stream with OK and no `finished`).
        set(vec![error_reply(vec![(KeyPick::Opened, 0, String::new())])], Ending::Silent);
        record(&store, "regress-ok-code", &td, &hostile_address).await;
        let st = run_answered(td.clone(), run("regress-ok-code", &hostile_address, 8)).await.unwrap_err();
        assert_eq!((st.code(), st.message()), (tonic::Code::Internal, "block decoder: (no message)"));

        // 2. A block decoder that goes silent: after --block-timeout-s the
        //    session moves to the real one and finishes (it used to wait for ever).
        set(vec![], Ending::Silent);
        record(&store, "regress-silent", &td, &hostile_address).await;
        assert_eq!(run_answered(td.clone(), run("regress-silent", &hostile_address, 16)).await.unwrap(), want[..16]);

        // 3. Errors naming every key cannot end a session on another block
        //    decoder's link (they used to end any session with that key).
        record(&store, "regress-bystander", &td, &bd).await;
        let bystander = tokio::spawn(run_answered(td.clone(), run("regress-bystander", &bd, 200)));
        while store.session("regress-bystander").await.unwrap().unwrap().generated < 8 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        set(vec![error_reply((0..1000).map(|k| (KeyPick::Other(k), 13, "hostile".into())).collect())], Ending::Close);
        record(&store, "regress-attacker", &td, &hostile_address).await;
        let _ = run_answered(td.clone(), run("regress-attacker", &hostile_address, 8)).await;
        assert_eq!(bystander.await.unwrap().unwrap(), want, "the bystander session was ended by another link's errors");
    });

    let hostile_config = ProptestConfig { cases: 32, ..config };
    let case = std::sync::atomic::AtomicU32::new(0);
    let outcomes = Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    proptest!(hostile_config, |(s in script(), n in 1u32..24)| {
        rt.block_on(async {
            *hostile.0.lock().unwrap() = Some(s);
            let id = format!("hostile-{}", case.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            record(&store, &id, &td, &hostile_address).await;
            let parameters = GenerationParameters { max_new_tokens: Some(n), temperature: Some(0.0), ignore_eos: true, ..Default::default() };
            let req = RunRequest {
                session_id: id,
                prompt_ids: vec![3, 1, 4, 1, 5],
                parameters: Some(parameters),
                block_decoder: hostile_address.clone(),
                max_migrations: 2,
                ..Default::default()
            };
            let outcome = match run_answered(td.clone(), req).await {
                Ok(tokens) => format!("finished with {} tokens", if tokens.len() == n as usize { "all" } else { "too few" }),
                Err(st) => format!("{:?}", st.code()),
            };
            *outcomes.lock().unwrap().entry(outcome).or_insert(0) += 1;
        });
    });
    println!("hostile block decoder, outcomes: {:?}", outcomes.lock().unwrap());
    // Each of them ended in the store too (finished or failed), none left open.
    assert_eq!(rt.block_on(store.unfinished()).unwrap(), vec![]);

    // Both processes are still up, idle, and serve a valid session.
    rt.block_on(async {
        for p in &cluster.procs {
            let active = metric_sum(&scrape_metrics(p.metrics_port), "blockserve_active_sessions", &[]);
            assert_eq!(active, 0.0, "{} has sessions left", p.tier);
        }
        let mut client = BlockDecoderClient::connect(bd.clone()).await.unwrap();
        let ctx = client.contexts(ContextsRequest { token_ids: vec![1, 2, 3, 4, 5, 6, 7, 8] }).await.unwrap().into_inner();
        assert_eq!(ctx.contexts.unwrap().rows, 2);
        let prompt = vec![3, 1, 4, 1, 5];
        let parameters = GenerationParameters { max_new_tokens: Some(16), temperature: Some(0.0), ignore_eos: true, ..Default::default() };
        record(&store, "after-fuzz", &td, &bd).await;
        let req = RunRequest {
            session_id: "after-fuzz".into(),
            prompt_ids: prompt.clone(),
            parameters: Some(parameters),
            block_decoder: bd.clone(),
            ..Default::default()
        };
        assert_eq!(run_answered(td.clone(), req).await.unwrap(), greedy_reference(&fixture_model(), &[prompt], 16)[0]);
    });
}
