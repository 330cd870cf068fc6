//! Request parameters (wire form) -> the model's sampling and stop settings, with
//! the validation messages clients see.

use blockserve_model::{SamplingParams, StopCriteria};
use blockserve_proto::v1::GenerationParameters;
use tonic::Status;

/// Used when a request leaves `max_new_tokens` unset.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 64;

pub struct Resolved {
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// Text stop sequences.
    pub stop_sequences: Vec<String>,
}

/// Resolve and validate. `eos` is the model's end id; `vocab` bounds stop ids.
pub fn resolve(p: &GenerationParameters, eos: Option<u32>, vocab: usize) -> Result<Resolved, Status> {
    let sampling = SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: p.top_k.unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed.unwrap_or(0),
    };
    sampling.validate().map_err(|e| Status::invalid_argument(e.to_string().trim_start_matches("invalid input: ").to_string()))?;
    if let Some(bad) = p.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!("stop_token_ids: token id {bad} is out of range (vocab size {vocab})")));
    }
    let max_new = p.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if max_new == 0 {
        return Err(Status::invalid_argument("max_new_tokens must be at least 1"));
    }
    Ok(Resolved {
        sampling,
        stop: StopCriteria { max_new_tokens: max_new as usize, eos_token_id: if p.ignore_eos { None } else { eos }, stop_token_ids: p.stop_token_ids.clone() },
        stop_sequences: p.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
    })
}
