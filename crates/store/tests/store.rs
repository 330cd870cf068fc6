//! The same contract checked on both stores: the in-process one and a real
//! redis-server.

use std::sync::Arc;
use std::time::Duration;

use blockserve_store::*;
use blockserve_testkit::RedisServer;

fn spec(id: &str) -> SessionSpec {
    SessionSpec {
        id: id.into(),
        prompt_ids: vec![1, 2, 3],
        parameters: blockserve_proto::v1::GenerationParameters { max_new_tokens: Some(8), ..Default::default() },
        created_at_ms: 42,
    }
}

fn to(td: &str) -> Assignment {
    Assignment { token_decoder: format!("http://{td}"), token_decoder_id: td.into(), block_decoder: "http://bd".into() }
}

fn app(id: &str, epoch: Epoch, offset: usize, tokens: &[u32]) -> Append {
    Append { id: id.into(), epoch, offset, tokens: tokens.to_vec() }
}

fn inst(id: &str, tier: Tier, active: u32) -> InstanceInfo {
    InstanceInfo {
        id: id.into(),
        tier,
        address: format!("http://{id}"),
        active_sessions: active,
        queued: 0,
        free_capacity: 10,
        updated_at_ms: 1,
        cache_limit_pages: 0,
    }
}

async fn contract(store: Arc<dyn SessionStore>) {
    // Leases: present while renewed, gone after the ttl, gone on deregister.
    store.register(&inst("a", Tier::TokenDecoder, 1), Duration::from_millis(300)).await.unwrap();
    store.register(&inst("b", Tier::TokenDecoder, 0), Duration::from_secs(30)).await.unwrap();
    store.register(&inst("c", Tier::BlockDecoder, 0), Duration::from_secs(30)).await.unwrap();
    let mut ids: Vec<String> = store.instances(Tier::TokenDecoder).await.unwrap().into_iter().map(|i| i.id).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = store.instances(Tier::TokenDecoder).await.unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, ["b"]);
    store.deregister(Tier::BlockDecoder, "c").await.unwrap();
    assert!(store.instances(Tier::BlockDecoder).await.unwrap().is_empty());

    // Sessions: created once, progress, tokens in order, one final state.
    assert!(store.create_session(&spec("s1"), &to("td1")).await.unwrap());
    assert!(!store.create_session(&spec("s1"), &to("td2")).await.unwrap(), "same id twice");
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.spec.clone(), r.generated, r.assignment.clone(), r.epoch, r.migrations), (SessionState::Queued, spec("s1"), 0, to("td1"), 0, 0));
    assert_eq!(store.set_progress("s1", 0, SessionState::Decoding).await.unwrap(), Write::Applied);
    // Ids past two bytes and past i32 come back whole.
    assert_eq!(store.append_many(&[app("s1", 0, 0, &[5, 6, 70_000, 4_000_000_000])]).await.unwrap(), [Write::Applied]);
    assert_eq!(store.append_many(&[app("s1", 0, 4, &[9])]).await.unwrap(), [Write::Applied]);
    assert_eq!(store.tokens("s1", 0).await.unwrap(), vec![5, 6, 70_000, 4_000_000_000, 9]);
    assert!(store.create_session(&spec("s2"), &to("td1")).await.unwrap());
    let w = store.append_many(&[app("s2", 0, 0, &[1, 2]), app("s1", 0, 5, &[10]), app("s2", 0, 2, &[3]), app("s2", 0, 3, &[])]).await.unwrap();
    assert_eq!(w, [Write::Applied; 4]);
    assert_eq!(store.tokens("s2", 0).await.unwrap(), vec![1, 2, 3]);
    assert_eq!(store.session("s2").await.unwrap().unwrap().generated, 3);
    assert_eq!(store.tokens("s1", 0).await.unwrap(), vec![5, 6, 70_000, 4_000_000_000, 9, 10]);
    assert!(store.append_many(&[]).await.unwrap().is_empty());
    let mut open = store.unfinished().await.unwrap();
    open.sort();
    assert_eq!(open, [("s1".to_string(), "td1".to_string()), ("s2".into(), "td1".into())]);
    // A retried write (its reply was lost) is not applied twice; a gap is an error.
    assert_eq!(store.append_many(&[app("s2", 0, 2, &[3])]).await.unwrap(), [Write::Applied]);
    assert_eq!(store.tokens("s2", 0).await.unwrap(), vec![1, 2, 3]);
    let gap = store.append_many(&[app("s2", 0, 5, &[4])]).await.unwrap_err().to_string();
    assert!(gap.contains("tokens written at offset 5 but 3 are recorded"), "{gap}");
    assert_eq!(store.tokens("s1", 3).await.unwrap(), vec![4_000_000_000, 9, 10]);
    assert_eq!(store.tokens("s1", 9).await.unwrap(), Vec::<u32>::new());
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.generated), (SessionState::Decoding, 6));
    assert!(r.first_token_at_ms.is_some());

    // Migration: the known output the store lacks is added, the epoch moves on,
    // and the old epoch's writes are fenced off.
    let moved = store.reassign("s2", 0, &to("td2"), &[1, 2, 3, 4, 5]).await.unwrap();
    assert_eq!(moved, Reassigned::Moved { epoch: 1, migrations: 1, tokens: vec![1, 2, 3, 4, 5] });
    assert!(store.unfinished().await.unwrap().contains(&("s2".into(), "td2".into())), "the unfinished list follows a move");
    assert_eq!(store.reassign("s2", 0, &to("td3"), &[]).await.unwrap(), Reassigned::Stale, "someone moved it first");
    assert_eq!(store.append_many(&[app("s2", 0, 5, &[6])]).await.unwrap(), [Write::Fenced]);
    assert_eq!(store.set_progress("s2", 0, SessionState::Prefilling).await.unwrap(), Write::Fenced);
    let done = Outcome { state: SessionState::Finished, finish_reason: "length".into(), error: None };
    assert!(!store.finish("s2", Some(0), &done, Duration::from_secs(5)).await.unwrap());
    assert_eq!(store.append_many(&[app("s2", 1, 5, &[6, 7])]).await.unwrap(), [Write::Applied]);
    let moved = store.reassign("s2", 1, &to("td3"), &[1, 2]).await.unwrap();
    assert_eq!(moved, Reassigned::Moved { epoch: 2, migrations: 2, tokens: vec![1, 2, 3, 4, 5, 6, 7] }, "the store knows more: kept");
    assert_eq!(store.set_block_decoder("s2", 1, "http://bd2").await.unwrap(), Write::Fenced);
    assert_eq!(store.set_block_decoder("s2", 2, "http://bd2").await.unwrap(), Write::Applied);
    let r = store.session("s2").await.unwrap().unwrap();
    let bd2 = Assignment { block_decoder: "http://bd2".into(), ..to("td3") };
    assert_eq!((r.assignment, r.epoch, r.migrations, r.generated), (bd2, 2, 3, 7));
    assert!(store.finish("s2", Some(2), &done, Duration::from_secs(5)).await.unwrap());
    assert_eq!(store.reassign("s2", 2, &to("td1"), &[]).await.unwrap(), Reassigned::Final);
    assert_eq!(store.unfinished().await.unwrap(), [("s1".to_string(), "td1".to_string())], "final sessions leave the unfinished list");
    assert_eq!(store.reassign("nope", 0, &to("td1"), &[]).await.unwrap(), Reassigned::Missing);

    let cancelled = Outcome { state: SessionState::Cancelled, finish_reason: "cancelled".into(), error: None };
    assert!(store.finish("s1", None, &cancelled, Duration::from_millis(400)).await.unwrap());
    assert!(!store.finish("s1", None, &done, Duration::from_secs(5)).await.unwrap(), "final state is kept");
    assert_eq!(store.set_progress("s1", 0, SessionState::Decoding).await.unwrap(), Write::Fenced);
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.finish_reason.as_deref()), (SessionState::Cancelled, Some("cancelled")));
    assert!(r.finished_at_ms.is_some());
    assert!(store.unfinished().await.unwrap().is_empty());
    // Finished sessions expire.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(store.session("s1").await.unwrap().is_none());
    assert!(store.tokens("s1", 0).await.unwrap().is_empty());
    // Unknown sessions are None and updates to them are harmless.
    assert!(store.session("nope").await.unwrap().is_none());
    assert!(!store.finish("nope", None, &done, Duration::from_secs(1)).await.unwrap());
}

#[tokio::test]
async fn memory_store_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store_contract() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "test:").await.unwrap();
    contract(Arc::new(store.clone())).await;

    // A record deleted behind the store's back leaves the unfinished set the
    // next time it is listed.
    assert!(store.create_session(&spec("gone"), &to("td1")).await.unwrap());
    assert_eq!(store.unfinished().await.unwrap(), [("gone".to_string(), "td1".to_string())]);
    let mut c = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL").arg("test:sess:gone").query_async::<()>(&mut c).await.unwrap();
    assert!(store.unfinished().await.unwrap().is_empty());
    let left: usize = redis::cmd("HLEN").arg("test:sessions:unfinished").query_async(&mut c).await.unwrap();
    assert_eq!(left, 0);
}
