//! The training losses, as mean cross-entropy (in f32, or f64 for gradient
//! checks) over the predicted tokens.
//!
//! - Block Transformer: the reference's token-decoding loss. Each row of
//!   `n` blocks runs through the embedder and block decoder; the context of
//!   block b (b < n-1) and the first L-1 tokens of block b+1 run through the
//!   token decoder, whose L outputs predict block b+1's L tokens. Block 0 is
//!   only context.
//! - Vanilla GPT-NeoX: every position predicts the next token.

use blockserve_model::Model;
use candle_core::{DType, Tensor, D};

use crate::{input, Result};

/// Mean loss of `model` over `rows` (equal lengths, a multiple of the block
/// length for a Block Transformer), and how many tokens it predicted.
pub fn loss(model: &Model, rows: &[Vec<u32>]) -> Result<(Tensor, usize)> {
    let (logits, targets) = match model {
        Model::Block(m) => {
            let l = m.block_length();
            let len = rows.first().map_or(0, |r| r.len());
            if !len.is_multiple_of(l) || len < 2 * l {
                return input(format!("a Block Transformer trains on windows of at least 2 whole blocks of {l} tokens, got {len}"));
            }
            let out = m.forward(rows)?;
            let targets: Vec<u32> = rows.iter().flat_map(|r| r[l..].iter().copied()).collect();
            (out.logits, targets)
        }
        Model::Vanilla(m) => {
            let t = rows.first().map_or(0, |r| r.len());
            if t < 2 {
                return input("a vanilla model trains on windows of at least 2 tokens");
            }
            let logits = m.forward(rows)?.narrow(1, 0, t - 1)?;
            let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
            (logits, targets)
        }
    };
    let v = logits.dim(D::Minus1)?;
    let n = targets.len();
    // f32 at least (f64 stays f64 for the gradient checks).
    let acc = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let logits = logits.reshape((n, v))?.to_dtype(acc)?;
    let targets = Tensor::from_vec(targets, n, logits.device())?;
    Ok((candle_nn::loss::cross_entropy(&logits, &targets)?, n))
}
