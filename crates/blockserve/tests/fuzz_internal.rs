//! Property tests of the internal messages (a bounded fuzz that runs in CI),
//! against real block-decoder and token-decoder processes with a real Redis:
//!
//! - link messages to the block decoder: arbitrary bytes decoded as `LinkUp`,
//!   and well-formed ones with hostile values (ids past the vocabulary,
//!   prompts that are not whole blocks, blocks with the wrong token count or
//!   index, keys nobody opened, repeated opens and closes);
//! - `Run` requests to the token decoder: hostile prompts, output to resume
//!   after, parameters, block-decoder addresses and session ids nobody owns.
//!
//! Every case gets an answer (an error naming the session, a context, or a
//! stream that ends with a status or `finished`), none hangs, and both
//! processes stay up and serve a valid session afterwards.

mod common;

use std::time::Duration;

use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::*;
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
    let blocks = (prop::collection::vec(0u64..6, 0..4), prop::collection::vec(0u32..8, 0..4), ids(20))
        .prop_map(|(keys, indices, token_ids)| BlockBatch { keys, indices, token_ids });
    let structured = (prop::collection::vec(open, 0..3), prop::option::of(blocks), prop::collection::vec(0u64..6, 0..3))
        .prop_map(|(opens, blocks, closes)| LinkUp { opens, blocks, closes });
    let raw = prop::collection::vec(any::<u8>(), 0..64).prop_filter_map("decodes as LinkUp", |b| LinkUp::decode(&b[..]).ok());
    prop_oneof![4 => structured, 1 => raw]
}

fn run_request(bd: String) -> impl Strategy<Value = RunRequest> {
    let params = (prop::option::of(0u32..40), prop::option::of(-1.0f32..3.0), prop::option::of(-0.5f32..1.5), any::<bool>()).prop_map(
        |(max_new_tokens, temperature, top_p, ignore_eos)| GenerationParameters { max_new_tokens, temperature, top_p, ignore_eos, ..Default::default() },
    );
    let address = prop_oneof![Just(bd), Just("http://127.0.0.1:1".to_string()), Just("not a url".to_string())];
    (ids(12), ids(9), params, address, any::<u64>(), 0u32..3)
        .prop_map(|(prompt_ids, generated_ids, parameters, block_decoder, epoch, max_migrations)| RunRequest {
            session_id: format!("nobody-{epoch}"),
            prompt_ids,
            parameters: Some(parameters),
            block_decoder,
            eos_token_id: None,
            generated_ids,
            epoch,
            migrations: 0,
            max_migrations,
        })
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
    let cluster = rt.block_on(Cluster::start(&fixture_model(), &[("block-decoder", 1, &[]), ("token-decoder", 1, &[])]));
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
            let end = tokio::time::timeout(Duration::from_secs(10), async { while let Some(_) = down.message().await.unwrap() {} }).await;
            assert!(end.is_ok(), "the link did not end after its client closed it");
        });
    });

    proptest!(config, |(req in run_request(bd.clone()))| {
        rt.block_on(async {
            let mut client = TokenDecoderClient::connect(td.clone()).await.unwrap();
            let answered = tokio::time::timeout(Duration::from_secs(30), async {
                match client.run(req).await {
                    Err(st) => assert!(!st.message().is_empty(), "a refusal without a message: {st:?}"),
                    Ok(s) => {
                        let mut s = s.into_inner();
                        loop {
                            match s.message().await {
                                Ok(Some(RunEvent { kind: Some(run_event::Kind::Finished(_)) })) => break,
                                Ok(Some(_)) => {}
                                Ok(None) => panic!("the stream ended without `finished` or a status"),
                                Err(st) => {
                                    assert!(!st.message().is_empty(), "a status without a message: {st:?}");
                                    break;
                                }
                            }
                        }
                    }
                }
            })
            .await;
            assert!(answered.is_ok(), "no answer within 30 s");
        });
    });

    // Both processes are still up, idle, and serve a valid session.
    rt.block_on(async {
        for p in &cluster.procs {
            let active = metric_sum(&scrape_metrics(p.metrics_port), "blockserve_active_sessions", &[]);
            assert_eq!(active, 0.0, "{} has sessions left", p.tier);
        }
        let mut client = BlockDecoderClient::connect(bd.clone()).await.unwrap();
        let ctx = client.contexts(ContextsRequest { token_ids: vec![1, 2, 3, 4, 5, 6, 7, 8] }).await.unwrap().into_inner();
        assert_eq!(ctx.contexts.unwrap().rows, 2);
    });
}
