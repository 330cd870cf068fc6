//! A block decoder driven at full rate on its own: synthetic token decoders
//! over the real link protocol. Each of `links` links opens its share of
//! `sessions` sessions with a `prompt_len`-token prompt, and answers every
//! context at once with the session's next block (fixed ids: the block
//! decoder's work does not depend on them), so nothing but the block decoder
//! and the link sets the pace. It reports blocks/s after a warm-up, the rate
//! of block-decoder steps, and so how many token-decoder GPUs one
//! block-decoder GPU can feed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::{BlockBatch, LinkUp, OpenBlocks};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Endpoint;

pub struct Synthetic {
    pub address: String,
    /// Blocks a session generates before it is closed and replaced by a new
    /// one (the block decoder admits a session for its prompt plus this many,
    /// within its position limit).
    pub session_blocks: u32,
    pub links: usize,
    pub sessions: usize,
    pub prompt_len: usize,
    pub block_length: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Run one link: open `keys`, then answer every context with the next block
/// until `stop`; blocks sent are counted in `blocks`. A session that reaches
/// `session_blocks` is closed and a new one (a new key, the same prompt
/// length) takes its place, so the load stays steady.
async fn link(s: Arc<Synthetic>, keys: std::ops::Range<u64>, blocks: Arc<AtomicU64>, stop: Instant) -> Result<()> {
    let channel = Endpoint::from_shared(s.address.clone())?
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", s.address))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut down = BlockDecoderClient::new(channel).max_decoding_message_size(usize::MAX).link(UnboundedReceiverStream::new(rx)).await?.into_inner();
    let l = s.block_length;
    let padded = s.prompt_len.div_ceil(l) * l;
    let prompt_blocks = (padded / l) as u32;
    let open = |key: u64| OpenBlocks {
        key,
        session_id: format!("synthetic-{key}"),
        prompt_ids: (0..padded).map(|i| 1 + ((key as usize * 31 + i * 7) % 250) as u32).collect(),
        max_new_blocks: s.session_blocks,
        traceparent: String::new(),
    };
    let mut open_keys: std::collections::HashSet<u64> = keys.clone().collect();
    // New keys for replacements: past every key a link starts with.
    let mut next_key = keys.end + (1 << 40);
    tx.send(LinkUp { opens: keys.clone().map(open).collect(), ..Default::default() })?;
    while let Some(msg) = down.message().await? {
        if let Some(e) = msg.errors.first() {
            bail!("the block decoder ended session {} with code {}: {}", e.key, e.code, e.message);
        }
        if Instant::now() >= stop {
            tx.send(LinkUp { closes: open_keys.into_iter().collect(), ..Default::default() })?;
            return Ok(());
        }
        let mut up = LinkUp { blocks: Some(BlockBatch::default()), ..Default::default() };
        let batch = up.blocks.as_mut().expect("set above");
        for (&key, &index) in msg.keys.iter().zip(&msg.block_indices) {
            if index + 1 >= prompt_blocks + s.session_blocks {
                // Done: close it, open a fresh one in its place.
                open_keys.remove(&key);
                up.closes.push(key);
                open_keys.insert(next_key);
                up.opens.push(open(next_key));
                next_key += 1;
            } else {
                batch.keys.push(key);
                batch.indices.push(index + 1);
                batch.token_ids.extend(std::iter::repeat_n(7, l));
            }
        }
        blocks.fetch_add(batch.keys.len() as u64, Ordering::Relaxed);
        tx.send(up)?;
    }
    bail!("the block decoder closed the link")
}

/// Drive the block decoder; returns blocks/s measured after the warm-up.
pub async fn run(s: Synthetic) -> Result<f64> {
    let s = Arc::new(s);
    let blocks = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop = start + s.warmup + s.duration;
    let per = s.sessions.div_ceil(s.links.max(1)) as u64;
    let mut tasks = vec![];
    for i in 0..s.links.max(1) as u64 {
        let keys = i * per..((i + 1) * per).min(s.sessions as u64);
        tasks.push(tokio::spawn(link(s.clone(), keys, blocks.clone(), stop)));
    }
    tokio::time::sleep_until((start + s.warmup).into()).await;
    let from = blocks.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep_until(stop.into()).await;
    let rate = (blocks.load(Ordering::Relaxed) - from) as f64 / t.elapsed().as_secs_f64();
    for task in tasks {
        task.await??;
    }
    Ok(rate)
}
