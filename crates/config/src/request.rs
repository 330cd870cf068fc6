//! What a request asks of the model, as plain values: how to choose tokens
//! ([`SamplingParams`]), when to stop ([`StopCriteria`]) and how its prompt
//! is cut into blocks ([`PromptLayout`]). The model crate
//! applies them to logits; the router validates them without any tensor code.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Hugging Face-style penalty on tokens already present in the prompt or
    /// output (1.0 = off): positive logits are divided by it, negative multiplied.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether the choice depends on earlier tokens (repetition penalty); callers
    /// can skip assembling the history when it does not.
    pub fn uses_history(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    /// Whether the next token is the plain argmax of the raw logits.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy() && !self.uses_history()
    }

    /// Reject values that have no meaning, naming the field and its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ConfigError::Input(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be finite and > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// How a prompt is cut into blocks of L tokens (`docs/prefix-cache.md`,
/// "The prompt layouts"; the model crate's `prompt` module lays them out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptLayout {
    /// The reference implementation's: the prompt is left-padded with id 0 to
    /// a whole number of blocks, so generation starts on a block boundary.
    /// Outputs equal the reference's; where block boundaries fall depends on
    /// the prompt's length modulo L.
    #[default]
    Reference,
    /// Block boundaries fixed from the prompt's first token: the block decoder
    /// sees the prompt's whole blocks, and its last `n mod L` tokens are the
    /// forced start of the first generated block. A shared prefix then falls
    /// on the same blocks whatever follows it. Prompts shorter than one block
    /// are left-padded as in `Reference`.
    Aligned,
}

impl PromptLayout {
    pub fn as_str(&self) -> &'static str {
        match self {
            PromptLayout::Reference => "reference",
            PromptLayout::Aligned => "aligned",
        }
    }

    /// Pad ids in front of a prompt of `n` tokens cut into blocks of `l`.
    pub fn pad(&self, n: usize, l: usize) -> usize {
        match self {
            PromptLayout::Aligned if n >= l => 0,
            _ => (l - n % l) % l,
        }
    }
}

impl std::fmt::Display for PromptLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PromptLayout {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(PromptLayout::Reference),
            "aligned" => Ok(PromptLayout::Aligned),
            _ => Err(ConfigError::Input(format!("prompt layout must be \"reference\" or \"aligned\", got {s:?}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence id (included in the output).
    Eos,
    /// `max_new_tokens` were generated.
    Length,
    /// A caller-given stop id was produced (included in the output).
    StopToken,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::StopToken => "stop_token",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopCriteria {
    pub max_new_tokens: usize,
    /// Usually the model config's eos id; `None` never stops on EOS (benchmarks).
    pub eos_token_id: Option<u32>,
    pub stop_token_ids: Vec<u32>,
}

impl StopCriteria {
    /// Append a decoded block to `generated` token by token, up to and
    /// including the first one that stops the session; returns why it stopped.
    pub fn extend(&self, generated: &mut Vec<u32>, block: &[u32]) -> Option<FinishReason> {
        for &t in block {
            generated.push(t);
            if let Some(r) = self.check(generated) {
                return Some(r);
            }
        }
        None
    }

    /// Why a session whose output so far is `generated` stops now, if it does.
    pub fn check(&self, generated: &[u32]) -> Option<FinishReason> {
        let last = generated.last().copied();
        if last.is_some() && last == self.eos_token_id {
            Some(FinishReason::Eos)
        } else if last.is_some_and(|t| self.stop_token_ids.contains(&t)) {
            Some(FinishReason::StopToken)
        } else if generated.len() >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}
