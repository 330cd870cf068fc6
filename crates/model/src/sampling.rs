//! Per-session token selection: repetition penalty, temperature, top-k, top-p, and
//! a seeded draw.
//!
//! The draw for the n-th generated token uses its own ChaCha stream `n` of the
//! session's seed, so a token depends only on (seed, n, logits, history): the same
//! in any batch, and reproducible when a session is replayed elsewhere.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use blockserve_config::SamplingParams;

/// One row of a batch's logits as the host sees it.
pub enum Row {
    /// The row's argmax, computed on the device (plain greedy rows).
    Token(u32),
    /// The whole row, for rows that sample, penalise or record logits.
    Logits(Vec<f32>),
}

/// Read a batch of logits `[b, V]` back for token selection. Rows with
/// `on_host[i] == false` only bring back their argmax (one id instead of V floats);
/// the others bring back the whole row.
pub fn read_rows(logits: &Tensor, on_host: &[bool]) -> Result<Vec<Row>> {
    if on_host.iter().all(|&h| h) {
        let rows = crate::settled(&logits.to_dtype(DType::F32)?, |t| t.to_vec2::<f32>())?;
        return Ok(rows.into_iter().map(Row::Logits).collect());
    }
    let ids = crate::settled(&crate::argmax::argmax_rows(logits)?, |t| t.to_vec1::<u32>())?;
    let host: Vec<u32> = (0..on_host.len() as u32).filter(|&i| on_host[i as usize]).collect();
    let mut full = if host.is_empty() {
        vec![]
    } else {
        let idx = Tensor::new(host.as_slice(), logits.device())?;
        logits.index_select(&idx, 0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?
    }
    .into_iter();
    Ok(ids.into_iter().zip(on_host).map(|(id, &h)| if h { Row::Logits(full.next().expect("one row per host index")) } else { Row::Token(id) }).collect())
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Choose the token at output index `n` of a session from its raw `logits`.
/// `history` is the prompt followed by the tokens generated so far.
pub fn sample(params: &SamplingParams, logits: &[f32], history: &[u32], n: u64) -> u32 {
    if params.is_greedy() && !params.uses_history() {
        return argmax(logits);
    }
    let mut logits = logits.to_vec();
    if params.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in history {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let l = &mut logits[t];
                *l = if *l > 0.0 { *l / params.repetition_penalty } else { *l * params.repetition_penalty };
            }
        }
    }
    if params.is_greedy() {
        return argmax(&logits);
    }
    // Candidates sorted by logit, highest first (stable: lower id wins ties).
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if params.top_k > 0 {
        idx.truncate(params.top_k);
    }
    let t = params.temperature as f64;
    let max = logits[idx[0]] as f64 / t;
    let mut probs: Vec<f64> = idx.iter().map(|&i| (logits[i] as f64 / t - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= params.top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    rng.set_stream(n);
    let mut u = rng.gen::<f64>() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    *idx.last().expect("at least one candidate") as u32
}

/// log p of `ids` `[.., k]` (u32) under `logits` `[.., k, V]`, in f32.
pub(crate) fn logprobs_of(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, candle_core::D::Minus1)?;
    Ok(logp.gather(&ids.unsqueeze(candle_core::D::Minus1)?, candle_core::D::Minus1)?.squeeze(candle_core::D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(p: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        (0..2000).map(|n| sample(p, logits, &[], n)).collect()
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(sample(&SamplingParams::greedy(), &[0.1, 3.0, 3.0, -1.0], &[], 0), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        let p = SamplingParams { repetition_penalty: 4.0, ..SamplingParams::greedy() };
        // 3.0 / 4 = 0.75 < 1.0; -0.1 * 4 = -0.4 would lose anyway.
        assert_eq!(sample(&p, &[1.0, 3.0, -0.1], &[1, 2], 0), 0);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0, 1.9, 1.8, -5.0, 0.0];
        let k2 = SamplingParams { temperature: 1.0, top_k: 2, seed: 7, ..Default::default() };
        let s = sampled(&k2, &logits);
        assert!(s.iter().all(|&t| t == 0 || t == 1));
        assert!(s.contains(&0) && s.contains(&1));
        // softmax of [2.0, 1.9, 1.8, ..] gives ~0.36 to id 0: top_p 0.3 keeps id 0 only.
        let p = SamplingParams { temperature: 1.0, top_p: 0.3, seed: 7, ..Default::default() };
        assert!(sampled(&p, &logits).iter().all(|&t| t == 0));
    }

    #[test]
    fn seeded_draws_repeat_and_depend_on_seed_and_index() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, seed: 42, ..Default::default() };
        let a = sampled(&p, &logits);
        assert_eq!(a, sampled(&p, &logits));
        let q = SamplingParams { seed: 43, ..p.clone() };
        assert_ne!(a, sampled(&q, &logits));
        // Empirical frequencies follow the softmax: the 7 ids with logit 1.8 against
        // the 8 ids with logit 0.0, per id.
        let c6 = a.iter().filter(|&&t| t % 7 == 6).count() as f64 / 7.0;
        let c0 = a.iter().filter(|&&t| t % 7 == 0).count() as f64 / 8.0;
        assert!((c6 / c0 - 1.8f64.exp()).abs() < 1.5, "ratio {}", c6 / c0);
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("top_p"));
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("temperature"));
    }
}
