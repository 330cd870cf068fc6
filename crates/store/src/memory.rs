//! The in-process store: the embedded default when no Redis URL is given. Same
//! semantics as Redis, lease and session expiry included, for one process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{
    now_ms, Append, Assignment, Epoch, InstanceInfo, Outcome, Reassigned, Result, SessionRecord, SessionSpec, SessionState, SessionStore, StoreError, Tier,
    Write,
};

#[derive(Default)]
struct Inner {
    instances: HashMap<(Tier, String), (InstanceInfo, Instant)>,
    sessions: HashMap<String, (SessionRecord, Vec<u32>, Option<Instant>)>,
}

impl Inner {
    fn purge(&mut self) {
        let now = Instant::now();
        self.instances.retain(|_, (_, exp)| *exp > now);
        self.sessions.retain(|_, (_, _, exp)| exp.is_none_or(|e| e > now));
    }
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.purge();
        f(&mut g)
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    async fn register(&self, info: &InstanceInfo, ttl: Duration) -> Result<()> {
        self.with(|s| s.instances.insert((info.tier, info.id.clone()), (info.clone(), Instant::now() + ttl)));
        Ok(())
    }

    async fn deregister(&self, tier: Tier, id: &str) -> Result<()> {
        self.with(|s| s.instances.remove(&(tier, id.to_string())));
        Ok(())
    }

    async fn instances(&self, tier: Tier) -> Result<Vec<InstanceInfo>> {
        Ok(self.with(|s| s.instances.values().filter(|(i, _)| i.tier == tier).map(|(i, _)| i.clone()).collect()))
    }

    async fn create_session(&self, spec: &SessionSpec, assignment: &Assignment) -> Result<bool> {
        Ok(self.with(|s| {
            if s.sessions.contains_key(&spec.id) {
                return false;
            }
            let rec = SessionRecord {
                spec: spec.clone(),
                assignment: assignment.clone(),
                epoch: 0,
                migrations: 0,
                state: SessionState::Queued,
                finish_reason: None,
                error: None,
                updated_at_ms: now_ms(),
                first_token_at_ms: None,
                finished_at_ms: None,
                generated: 0,
                reused_prompt_blocks: 0,
            };
            s.sessions.insert(spec.id.clone(), (rec, vec![], None));
            true
        }))
    }

    async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        Ok(self.with(|s| s.sessions.get(id).map(|(r, _, _)| r.clone())))
    }

    async fn set_progress(&self, id: &str, epoch: Epoch, state: SessionState) -> Result<Write> {
        Ok(self.with(|s| match s.sessions.get_mut(id) {
            Some((r, _, _)) if writable(r, Some(epoch)) => {
                r.state = state;
                r.updated_at_ms = now_ms();
                Write::Applied
            }
            _ => Write::Fenced,
        }))
    }

    async fn set_block_decoder(&self, id: &str, epoch: Epoch, address: &str) -> Result<Write> {
        Ok(self.with(|s| match s.sessions.get_mut(id) {
            Some((r, _, _)) if writable(r, Some(epoch)) => {
                r.assignment.block_decoder = address.to_string();
                r.migrations += 1;
                r.updated_at_ms = now_ms();
                Write::Applied
            }
            _ => Write::Fenced,
        }))
    }

    async fn set_reused_blocks(&self, id: &str, epoch: Epoch, blocks: u32) -> Result<Write> {
        Ok(self.with(|s| match s.sessions.get_mut(id) {
            Some((r, _, _)) if writable(r, Some(epoch)) => {
                r.reused_prompt_blocks = blocks;
                Write::Applied
            }
            _ => Write::Fenced,
        }))
    }

    async fn append_many(&self, batch: &[Append]) -> Result<Vec<Write>> {
        self.with(|s| {
            let mut out = Vec::with_capacity(batch.len());
            for a in batch {
                let Some((r, t, _)) = s.sessions.get_mut(&a.id).filter(|(r, _, _)| writable(r, Some(a.epoch))) else {
                    out.push(Write::Fenced);
                    continue;
                };
                if t.len() < a.offset + a.tokens.len() {
                    if t.len() != a.offset {
                        return Err(gap(a, t.len()));
                    }
                    t.extend_from_slice(&a.tokens);
                    r.generated = t.len();
                    // As the Redis store: the first append stamps the first
                    // token (and the update); later ones only add tokens.
                    if a.offset == 0 && !a.tokens.is_empty() {
                        r.updated_at_ms = now_ms();
                        r.first_token_at_ms.get_or_insert(r.updated_at_ms);
                    }
                }
                out.push(Write::Applied);
            }
            Ok(out)
        })
    }

    async fn tokens(&self, id: &str, from: usize) -> Result<Vec<u32>> {
        Ok(self.with(|s| s.sessions.get(id).map(|(_, t, _)| t.get(from..).unwrap_or(&[]).to_vec()).unwrap_or_default()))
    }

    async fn finish(&self, id: &str, epoch: Option<Epoch>, outcome: &Outcome, ttl: Duration) -> Result<bool> {
        Ok(self.with(|s| match s.sessions.get_mut(id) {
            Some((r, _, exp)) if writable(r, epoch) => {
                r.state = outcome.state;
                r.finish_reason = Some(outcome.finish_reason.clone());
                r.error = outcome.error.clone();
                r.updated_at_ms = now_ms();
                r.finished_at_ms = Some(r.updated_at_ms);
                *exp = Some(Instant::now() + ttl);
                true
            }
            _ => false,
        }))
    }

    async fn reassign(&self, id: &str, expected: Epoch, to: &Assignment, known: &[u32]) -> Result<Reassigned> {
        Ok(self.with(|s| {
            let Some((r, t, _)) = s.sessions.get_mut(id) else { return Reassigned::Missing };
            if r.state.is_final() {
                return Reassigned::Final;
            }
            if r.epoch != expected {
                return Reassigned::Stale;
            }
            if known.len() > t.len() {
                t.extend_from_slice(&known[t.len()..]);
                r.generated = t.len();
            }
            r.epoch += 1;
            r.migrations += 1;
            r.assignment = to.clone();
            r.updated_at_ms = now_ms();
            Reassigned::Moved { epoch: r.epoch, migrations: r.migrations, tokens: t.clone() }
        }))
    }

    async fn unfinished(&self) -> Result<Vec<(String, String)>> {
        Ok(self.with(|s| {
            s.sessions.iter().filter(|(_, (r, _, _))| !r.state.is_final()).map(|(id, (r, _, _))| (id.clone(), r.assignment.token_decoder_id.clone())).collect()
        }))
    }
}

/// A write with `epoch` (or any write, without one) may change this session.
fn writable(r: &SessionRecord, epoch: Option<Epoch>) -> bool {
    !r.state.is_final() && epoch.is_none_or(|e| e == r.epoch)
}

pub(crate) fn gap(a: &Append, have: usize) -> StoreError {
    StoreError::Corrupt(format!("session {}: tokens written at offset {} but {have} are recorded (a write went missing)", a.id, a.offset))
}
