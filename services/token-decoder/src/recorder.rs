//! Group commit of generated tokens. One engine batch hands thousands of
//! sessions a block at the same moment; each session must record its tokens
//! before it relays them (so a client that resumes from the store never sees
//! fewer tokens than it was sent). The recorder gathers what the sessions
//! queue while its previous write is in flight and writes it as one batch:
//! one store round trip per batch instead of one per session and block.

use std::sync::Arc;

use blockserve_store::{SessionStore, StoreError};
use tokio::sync::{mpsc, oneshot};

type Entry = (String, Vec<u32>, oneshot::Sender<Result<(), StoreError>>);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Entry>,
}

impl Recorder {
    /// Start the writer task (on the current runtime).
    pub fn start(store: Arc<dyn SessionStore>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Entry>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut entries = vec![first];
                while let Ok(e) = rx.try_recv() {
                    entries.push(e);
                }
                let (batch, replies): (Vec<(String, Vec<u32>)>, Vec<_>) = entries.into_iter().map(|(id, t, r)| ((id, t), r)).unzip();
                let result = store.append_many(&batch).await;
                for r in replies {
                    let _ = r.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Append a session's tokens; resolves once they are stored.
    pub async fn append(&self, id: &str, tokens: &[u32]) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || StoreError::Unavailable("token recorder stopped".into());
        self.tx.send((id.to_string(), tokens.to_vec(), reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}
