//! Request validation with messages that name the field and the limit.
//!
//! Everything a client sent that a message repeats goes through [`echo`]: a
//! status is a header, and a long one makes some clients fail on the size of
//! the response instead of showing the error.

use blockserve_proto::v1::{generate_request, score_request, GenerateRequest};
use blockserve_text::Tokenizer;
use tonic::Status;

pub const MAX_SESSION_ID_LEN: usize = 128;

/// Longest piece of client input a message repeats.
const ECHO_CHARS: usize = 48;

/// `s` for an error message: quoted, cut to a short prefix when long.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// A session id a client chose or refers to.
pub fn session_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_SESSION_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(Status::invalid_argument(format!("session_id must be 1..{MAX_SESSION_ID_LEN} characters of [A-Za-z0-9._-], got {}", echo(id))));
    }
    Ok(())
}

/// A prompt as the client sent it.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    /// Text to tokenize (worth moving off the threads that serve calls).
    pub fn is_text(&self) -> bool {
        matches!(self, Prompt::Text(_))
    }
}

pub fn generate_prompt(req: &GenerateRequest) -> Result<Prompt, Status> {
    match &req.prompt {
        Some(generate_request::Prompt::Text(t)) => Ok(Prompt::Text(t.clone())),
        Some(generate_request::Prompt::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids.clone())),
        None => Err(Status::invalid_argument("prompt is required (text or token_ids)")),
    }
}

pub fn score_input(input: &Option<score_request::Input>) -> Result<Prompt, Status> {
    match input {
        Some(score_request::Input::Text(t)) => Ok(Prompt::Text(t.clone())),
        Some(score_request::Input::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids.clone())),
        None => Err(Status::invalid_argument("input is required (text or token_ids)")),
    }
}

/// What bounds a prompt before the model sees it.
#[derive(Clone, Copy, Debug)]
pub struct PromptLimits {
    pub vocab: usize,
    /// Longest text tokenized: the model's context times the longest token's
    /// bytes. Longer text has more tokens than the context holds whatever it
    /// says, so it is refused before the tokenizer spends time and memory on it.
    pub max_text_bytes: usize,
}

impl PromptLimits {
    pub fn new(vocab: usize, max_total_tokens: usize, tokenizer: Option<&Tokenizer>) -> Self {
        let per_token = tokenizer.map_or(1, |t| t.max_token_bytes().max(1));
        Self { vocab, max_text_bytes: max_total_tokens.saturating_mul(per_token) }
    }
}

/// The prompt as token ids.
pub fn prompt_ids(prompt: Prompt, tokenizer: Option<&Tokenizer>, limits: PromptLimits) -> Result<Vec<u32>, Status> {
    let ids = match prompt {
        Prompt::Text(t) => {
            if t.len() > limits.max_text_bytes {
                return Err(Status::invalid_argument(format!(
                    "prompt.text is {} bytes; the limit is {} bytes (the model's context in tokens times the longest token's bytes)",
                    t.len(),
                    limits.max_text_bytes
                )));
            }
            match tokenizer {
                Some(tok) => tok.encode(&t).map_err(|e| Status::invalid_argument(e.to_string()))?,
                None => return Err(Status::invalid_argument("prompt.text needs a tokenizer.json in the model directory; send prompt.token_ids instead")),
            }
        }
        Prompt::Ids(ids) => ids,
    };
    if ids.is_empty() {
        return Err(Status::invalid_argument("prompt must not be empty"));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= limits.vocab) {
        return Err(Status::invalid_argument(format!("prompt.token_ids: token id {bad} is out of range (vocab size {})", limits.vocab)));
    }
    Ok(ids)
}

/// Length limits: `max_new` within the server limit, prompt + max_new within the
/// model's context.
pub fn lengths(prompt: usize, max_new: usize, max_new_limit: usize, max_total: usize) -> Result<(), Status> {
    if max_new > max_new_limit {
        return Err(Status::invalid_argument(format!("max_new_tokens {max_new} exceeds the limit of {max_new_limit}")));
    }
    if prompt >= max_total {
        return Err(Status::invalid_argument(format!("prompt has {prompt} tokens; the model's context allows at most {}", max_total - 1)));
    }
    if prompt + max_new > max_total {
        return Err(Status::invalid_argument(format!(
            "prompt ({prompt} tokens) + max_new_tokens ({max_new}) exceeds the model's context of {max_total} tokens"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_a_short_prefix_of_long_input() {
        assert_eq!(echo("abc"), "\"abc\"");
        let long = "x".repeat(10_000);
        assert_eq!(echo(&long), format!("{:?}... (10000 bytes)", "x".repeat(48)));
        let e = session_id(&long).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), format!("session_id must be 1..128 characters of [A-Za-z0-9._-], got {:?}... (10000 bytes)", "x".repeat(48)));
        // Multi-byte characters are cut on a character boundary.
        assert_eq!(echo(&"é".repeat(60)), format!("{:?}... (120 bytes)", "é".repeat(48)));
        assert_eq!(session_id("").unwrap_err().message(), "session_id must be 1..128 characters of [A-Za-z0-9._-], got \"\"");
    }

    #[test]
    fn refuses_text_over_the_byte_limit_before_tokenizing() {
        let limits = PromptLimits { vocab: 10, max_text_bytes: 8 };
        // No tokenizer is needed to refuse it.
        let e = prompt_ids(Prompt::Text("123456789".into()), None, limits).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "prompt.text is 9 bytes; the limit is 8 bytes (the model's context in tokens times the longest token's bytes)")
        );
        assert_eq!(prompt_ids(Prompt::Ids(vec![1, 9]), None, limits).unwrap(), vec![1, 9]);
        assert_eq!(prompt_ids(Prompt::Ids(vec![10]), None, limits).unwrap_err().message(), "prompt.token_ids: token id 10 is out of range (vocab size 10)");
    }
}
