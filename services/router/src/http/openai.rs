//! OpenAI's completion and chat requests as the session core's
//! `GenerateRequest`, and the session's events as OpenAI's responses.
//!
//! Parameters the model cannot honour are refused with a 400 naming them:
//! several completions per request (`n`, `best_of`), `suffix`, presence and
//! frequency penalties, `logit_bias`, more than the chosen token's
//! log-probability, and any field this front door does not know.

use blockserve_proto::v1::{generate_request, GenerateRequest, GenerationParameters, PromptLayout, TokenIds};
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::ApiError;

/// A prompt: text, or token ids (a list of one text is the text).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What completions and chat completions share.
#[derive(Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// Extensions: as in the gRPC API.
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// "reference" or "aligned" (unset: the router's --prompt-layout).
    pub prompt_layout: Option<String>,
    // Accepted only at the values that ask for nothing this server lacks.
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub echo: bool,
    /// How many of the likeliest tokens' log-probabilities to return: only the
    /// chosen token's is computed, so 0 or 1.
    pub logprobs: Option<u32>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

/// A message's content: a string, or a list of parts (only text parts: the
/// model reads nothing else).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

impl Content {
    /// The text, or a 400 naming the first part that is not text.
    pub fn text(&self, message: usize) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                if let Some((j, p)) = parts.iter().enumerate().find(|(_, p)| p.kind != "text") {
                    return Err(ApiError::invalid(
                        "messages",
                        format!(
                            "messages[{message}].content[{j}]: parts of type {} are not supported; this model reads text only",
                            crate::validate::echo(&p.kind)
                        ),
                    ));
                }
                Ok(parts.iter().map(|p| p.text.as_str()).collect())
            }
        }
    }
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

/// The fields of [`Common`].
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "repetition_penalty",
    "ignore_eos",
    "prompt_layout",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
];
pub const COMPLETION: &[&str] = &["prompt", "echo", "logprobs", "best_of", "suffix"];
pub const CHAT: &[&str] = &["messages", "logprobs", "top_logprobs"];

/// A request body with only the fields `own` and [`Common`] name (any other
/// is a 400 naming it: a parameter silently ignored would be a lie), or a
/// 400 naming the field that does not parse.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], own: &[&str]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("the request body is not JSON: {e}")))?;
    let Some(object) = value.as_object() else { return Err(ApiError::invalid("body", "the request body must be a JSON object")) };
    if let Some(k) = object.keys().find(|k| !own.contains(&k.as_str()) && !COMMON.contains(&k.as_str())) {
        let shown: String = k.chars().take(64).collect();
        return Err(ApiError::invalid(&shown, format!("{shown}: this server does not support this parameter")));
    }
    serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        // serde names the field between backticks: "missing field `prompt`".
        let param = text.split('`').nth(1).unwrap_or("body").to_string();
        ApiError::invalid(&param, format!("the request body: {text}"))
    })
}

impl Common {
    /// Refuse what the model cannot do; check the model's name.
    pub fn check(&self, served: &str) -> Result<(), ApiError> {
        if let Some(m) = self.model.as_deref().filter(|m| *m != served) {
            return Err(ApiError::not_found(
                "model_not_found",
                format!("the model `{}` does not exist; this server serves `{served}`", m.chars().take(64).collect::<String>()),
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "n: only one completion per request is supported (send n = 1, or several requests)"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(ApiError::invalid("presence_penalty", "presence_penalty is not supported; use repetition_penalty (> 0, 1 = off)"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(ApiError::invalid("frequency_penalty", "frequency_penalty is not supported; use repetition_penalty (> 0, 1 = off)"));
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid("logit_bias", "logit_bias is not supported"));
        }
        self.prompt_layout()?;
        Ok(())
    }

    fn prompt_layout(&self) -> Result<PromptLayout, ApiError> {
        match self.prompt_layout.as_deref() {
            None => Ok(PromptLayout::Unspecified),
            Some("reference") => Ok(PromptLayout::Reference),
            Some("aligned") => Ok(PromptLayout::Aligned),
            Some(other) => {
                Err(ApiError::invalid("prompt_layout", format!("prompt_layout must be \"reference\" or \"aligned\", got {}", crate::validate::echo(other))))
            }
        }
    }

    /// The generation parameters, with OpenAI's defaults for what is unset
    /// (16 tokens, temperature 1).
    pub fn parameters(&self) -> GenerationParameters {
        GenerationParameters {
            max_new_tokens: Some(self.max_completion_tokens.or(self.max_tokens).unwrap_or(16)),
            temperature: Some(self.temperature.unwrap_or(1.0)),
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: match &self.stop {
                None => vec![],
                Some(StopField::One(s)) => vec![s.clone()],
                Some(StopField::Many(v)) => v.clone(),
            },
            stop_token_ids: vec![],
            ignore_eos: self.ignore_eos,
            // Checked by `check`.
            prompt_layout: self.prompt_layout().unwrap_or_default() as i32,
        }
    }

    /// OpenAI's `user` (an end-user id for abuse monitoring) is logged, not
    /// acted on.
    pub fn log_user(&self) {
        if let Some(u) = &self.user {
            tracing::debug!(user = %crate::validate::echo(u), "OpenAI request for an end user");
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl CompletionRequest {
    /// The session core's request.
    pub fn to_generate(&self, served: &str) -> Result<GenerateRequest, ApiError> {
        self.common.check(served)?;
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("best_of", "best_of: only one completion per request is supported"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::invalid("suffix", "suffix is not supported (the model completes text left to right)"));
        }
        if self.logprobs.is_some_and(|n| n > 1) {
            return Err(ApiError::invalid("logprobs", "logprobs: at most 1 (only the chosen token's log-probability is computed)"));
        }
        let prompt = match &self.prompt {
            PromptField::Text(t) => generate_request::Prompt::Text(t.clone()),
            PromptField::Ids(ids) => generate_request::Prompt::TokenIds(TokenIds { ids: ids.clone() }),
            PromptField::Texts(v) if v.len() == 1 => generate_request::Prompt::Text(v[0].clone()),
            PromptField::Texts(v) => {
                return Err(ApiError::invalid("prompt", format!("prompt: one prompt per request is supported, got {}", v.len())));
            }
        };
        Ok(GenerateRequest { prompt: Some(prompt), parameters: Some(self.common.parameters()), session_id: String::new() })
    }

    /// The prompt as text, for `echo` (token-id prompts echo their decoding).
    pub fn prompt_text(&self, tokenizer: Option<&blockserve_text::Tokenizer>) -> String {
        match &self.prompt {
            PromptField::Text(t) => t.clone(),
            PromptField::Texts(v) => v.concat(),
            PromptField::Ids(ids) => tokenizer.map(|t| t.decode(ids)).unwrap_or_default(),
        }
    }
}

/// OpenAI's finish reason for the core's.
pub fn finish_reason(reason: i32) -> &'static str {
    use blockserve_proto::v1::FinishReason as F;
    match F::try_from(reason) {
        Ok(F::Length) => "length",
        Ok(F::Eos) | Ok(F::Stop) => "stop",
        Ok(F::Cancelled) => "cancelled",
        _ => "error",
    }
}

pub fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The `logprobs` object of a completion choice: each chosen token, its
/// log-probability (null when the model cannot score it: tokens of the
/// first block have no context), and as "top" only itself.
pub fn logprobs_object(tokens: &[String], logprobs: &[Option<f32>], offsets: &[usize], top: bool) -> Value {
    let top_logprobs: Value = if top { Value::Array(tokens.iter().zip(logprobs).map(|(t, lp)| json!({ t: lp })).collect()) } else { Value::Null };
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_logprobs, "text_offset": offsets})
}
