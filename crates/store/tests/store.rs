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
        parameters: serde_json::json!({ "max_new_tokens": 8 }),
        token_decoder: "http://127.0.0.1:1".into(),
        block_decoder: "http://127.0.0.1:2".into(),
        created_at_ms: 42,
    }
}

fn inst(id: &str, tier: Tier, active: u32) -> InstanceInfo {
    InstanceInfo { id: id.into(), tier, address: format!("http://{id}"), active_sessions: active, queued: 0, free_capacity: 10, updated_at_ms: 1 }
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
    assert!(store.create_session(&spec("s1")).await.unwrap());
    assert!(!store.create_session(&spec("s1")).await.unwrap(), "same id twice");
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.spec.clone(), r.generated), (SessionState::Queued, spec("s1"), 0));
    store.set_progress("s1", SessionState::Decoding).await.unwrap();
    store.append_tokens("s1", &[5, 6, 7, 8]).await.unwrap();
    store.append_tokens("s1", &[9]).await.unwrap();
    assert_eq!(store.tokens("s1", 0).await.unwrap(), vec![5, 6, 7, 8, 9]);
    assert!(store.create_session(&spec("s2")).await.unwrap());
    store.append_many(&[("s2".into(), vec![1, 2]), ("s1".into(), vec![10]), ("s2".into(), vec![3]), ("s2".into(), vec![])]).await.unwrap();
    assert_eq!(store.tokens("s2", 0).await.unwrap(), vec![1, 2, 3]);
    assert_eq!(store.session("s2").await.unwrap().unwrap().generated, 3);
    assert_eq!(store.tokens("s1", 0).await.unwrap(), vec![5, 6, 7, 8, 9, 10]);
    store.append_many(&[]).await.unwrap();
    assert_eq!(store.tokens("s1", 3).await.unwrap(), vec![8, 9, 10]);
    assert_eq!(store.tokens("s1", 9).await.unwrap(), Vec::<u32>::new());
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.generated), (SessionState::Decoding, 6));
    assert!(r.first_token_at_ms.is_some());

    let cancelled = Outcome { state: SessionState::Cancelled, finish_reason: "cancelled".into(), error: None };
    let done = Outcome { state: SessionState::Finished, finish_reason: "length".into(), error: None };
    assert!(store.finish("s1", &cancelled, Duration::from_millis(400)).await.unwrap());
    assert!(!store.finish("s1", &done, Duration::from_secs(5)).await.unwrap(), "final state is kept");
    store.set_progress("s1", SessionState::Decoding).await.unwrap();
    let r = store.session("s1").await.unwrap().unwrap();
    assert_eq!((r.state, r.finish_reason.as_deref()), (SessionState::Cancelled, Some("cancelled")));
    assert!(r.finished_at_ms.is_some());
    // Finished sessions expire.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(store.session("s1").await.unwrap().is_none());
    assert!(store.tokens("s1", 0).await.unwrap().is_empty());
    // Unknown sessions are None and updates to them are harmless.
    assert!(store.session("nope").await.unwrap().is_none());
    assert!(!store.finish("nope", &done, Duration::from_secs(1)).await.unwrap());
}

#[tokio::test]
async fn memory_store_contract() {
    contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store_contract() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "test:").await.unwrap();
    contract(Arc::new(store)).await;
}
