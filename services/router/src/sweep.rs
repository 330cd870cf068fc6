//! The orphan sweep. A session's router relays it and moves it when its token
//! decoder dies; a client that lost its router resumes through another, whose
//! follower does the same. A session nobody follows (its router died and its
//! client has not come back) has no one to notice that its token decoder died
//! too: without the sweep it would stay unfinished in the store for ever.
//!
//! Every router looks through the unfinished sessions every
//! `--orphan-sweep-s`. A session is taken over (moved to a live token decoder,
//! which finishes it on its own; a client can still `Resume` it) when, at two
//! looks in a row, its output has not grown and either its token decoder is
//! no longer registered or it is still `queued` long after creation (its
//! router died before handing it to the token decoder). Routers may race for
//! the same session: the move is fenced by the session's epoch, so one wins.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockserve_store::{now_ms, Epoch, SessionState, Tier};
use tokio::sync::watch;

use crate::sessions::Router;

/// A session still `queued` this long after its last update lost its router
/// before it started (a start takes milliseconds).
const QUEUED_TOO_LONG_MS: u64 = 30_000;
/// Sessions of live token decoders are read (to find stuck `queued` ones) at
/// every this many looks only; those of dead token decoders at every look.
const FULL_LOOK_EVERY: u64 = 6;

/// Run until `stop` turns true (`every` zero: never).
pub async fn run(router: Arc<Router>, every: Duration, mut stop: watch::Receiver<bool>) {
    if every.is_zero() {
        return;
    }
    // What each suspect looked like at the previous look: (generated, epoch).
    let mut suspects: HashMap<String, (usize, Epoch)> = HashMap::new();
    // Sessions a take-over task is working on (a move may take a while).
    let moving: Arc<Mutex<HashSet<String>>> = Default::default();
    for look in 1u64.. {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (Ok(unfinished), Ok(live)) = (router.store.unfinished().await, router.store.instances(Tier::TokenDecoder).await) else {
            // The store is down: look again next time, from scratch. Right
            // after an outage, leases and buffered writes may still be catching
            // up, so no session counts as stalled across it.
            suspects.clear();
            continue;
        };
        let live: HashSet<String> = live.into_iter().map(|i| i.id).collect();
        let full = look % FULL_LOOK_EVERY == 0;
        let mut next = HashMap::new();
        for (id, token_decoder) in unfinished {
            if live.contains(&token_decoder) && !full && !suspects.contains_key(&id) {
                continue;
            }
            let Ok(Some(rec)) = router.store.session(&id).await else { continue };
            let stuck_queued = rec.state == SessionState::Queued && now_ms().saturating_sub(rec.updated_at_ms) > QUEUED_TOO_LONG_MS;
            if rec.state.is_final() || (live.contains(&rec.assignment.token_decoder_id) && !stuck_queued) {
                continue;
            }
            let mark = (rec.generated, rec.epoch);
            if suspects.get(&id) != Some(&mark) {
                next.insert(id, mark); // first sighting, or it moved on: look again next time
                continue;
            }
            if !moving.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone()) {
                continue;
            }
            let (router, moving) = (router.clone(), moving.clone());
            tokio::spawn(async move {
                let why = match stuck_queued {
                    true => "it never started (its router died first)".to_string(),
                    false => format!("token decoder {} left the registry and nobody follows the session", rec.assignment.token_decoder),
                };
                router.take_over(&id, &rec, &why).await;
                moving.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            });
        }
        suspects = next;
    }
}
