//! Request validation with messages that name the field and the limit.

use blockserve_proto::v1::{generate_request, score_request, GenerateRequest};
use blockserve_text::Tokenizer;
use tonic::Status;

pub const MAX_SESSION_ID_LEN: usize = 128;

pub fn session_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_SESSION_ID_LEN || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(Status::invalid_argument(format!("session_id must be 1..{MAX_SESSION_ID_LEN} characters of [A-Za-z0-9._-], got {id:?}")));
    }
    Ok(())
}

/// The prompt of a request as token ids.
pub fn prompt_ids(text: Option<&str>, ids: Option<&[u32]>, tokenizer: Option<&Tokenizer>, vocab: usize) -> Result<Vec<u32>, Status> {
    let ids = match (text, ids) {
        (Some(t), _) => match tokenizer {
            Some(tok) => tok.encode(t).map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => return Err(Status::invalid_argument("prompt.text needs a tokenizer.json in the model directory; send prompt.token_ids instead")),
        },
        (None, Some(ids)) => ids.to_vec(),
        (None, None) => return Err(Status::invalid_argument("prompt is required (text or token_ids)")),
    };
    if ids.is_empty() {
        return Err(Status::invalid_argument("prompt must not be empty"));
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Status::invalid_argument(format!("prompt.token_ids: token id {bad} is out of range (vocab size {vocab})")));
    }
    Ok(ids)
}

pub fn generate_prompt(req: &GenerateRequest, tokenizer: Option<&Tokenizer>, vocab: usize) -> Result<Vec<u32>, Status> {
    match &req.prompt {
        Some(generate_request::Prompt::Text(t)) => prompt_ids(Some(t), None, tokenizer, vocab),
        Some(generate_request::Prompt::TokenIds(ids)) => prompt_ids(None, Some(&ids.ids), tokenizer, vocab),
        None => prompt_ids(None, None, tokenizer, vocab),
    }
}

pub fn score_input(input: &Option<score_request::Input>, tokenizer: Option<&Tokenizer>, vocab: usize) -> Result<Vec<u32>, Status> {
    match input {
        Some(score_request::Input::Text(t)) => prompt_ids(Some(t), None, tokenizer, vocab),
        Some(score_request::Input::TokenIds(ids)) => prompt_ids(None, Some(&ids.ids), tokenizer, vocab),
        None => prompt_ids(None, None, tokenizer, vocab),
    }
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
