//! Generation parameters: validated once, where a request enters (the router),
//! into the value the session store keeps, migrations reuse and the token
//! decoder runs; and that value as the model's sampling and stop settings.
//!
//! Adding a parameter touches the proto, [`validate`] and the place that uses
//! it ([`resolve`] or its caller): the store and the internal calls carry the
//! whole message.

use blockserve_config::{PromptLayout, SamplingParams, StopCriteria};
use blockserve_proto::v1::{self as pb, GenerationParameters};
use tonic::Status;

/// Used when a request leaves `max_new_tokens` unset.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 64;

pub struct Resolved {
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// Text stop sequences.
    pub stop_sequences: Vec<String>,
    pub layout: PromptLayout,
}

/// Check `p` (messages name the field and the limit) and return it with every
/// default filled in and empty stop sequences dropped. `vocab` bounds stop
/// ids; `layout` is the deployment's prompt layout, for requests that leave
/// it unset. Validating a validated value returns it unchanged.
pub fn validate(p: &GenerationParameters, vocab: usize, layout: PromptLayout) -> Result<GenerationParameters, Status> {
    let prompt_layout = match pb::PromptLayout::try_from(p.prompt_layout) {
        Ok(pb::PromptLayout::Unspecified) => to_proto(layout),
        Ok(l) => l,
        Err(_) => {
            let msg = format!("prompt_layout: unknown value {} (1: reference, 2: aligned, 0: the server's default)", p.prompt_layout);
            return Err(Status::invalid_argument(msg));
        }
    };
    let v = GenerationParameters {
        max_new_tokens: Some(p.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS)),
        temperature: Some(p.temperature.unwrap_or(0.0)),
        top_k: Some(p.top_k.unwrap_or(0)),
        top_p: Some(p.top_p.unwrap_or(1.0)),
        repetition_penalty: Some(p.repetition_penalty.unwrap_or(1.0)),
        seed: Some(p.seed.unwrap_or(0)),
        stop: p.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
        prompt_layout: prompt_layout as i32,
    };
    sampling(&v).validate().map_err(|e| Status::invalid_argument(e.to_string().trim_start_matches("invalid input: ").to_string()))?;
    if let Some(bad) = v.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!("stop_token_ids: token id {bad} is out of range (vocab size {vocab})")));
    }
    if v.max_new_tokens == Some(0) {
        return Err(Status::invalid_argument("max_new_tokens must be at least 1"));
    }
    Ok(v)
}

fn sampling(p: &GenerationParameters) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: p.top_k.unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed.unwrap_or(0),
    }
}

/// The model's settings for validated parameters. `eos` is the model's end id.
pub fn resolve(p: &GenerationParameters, eos: Option<u32>) -> Resolved {
    Resolved {
        sampling: sampling(p),
        stop: StopCriteria {
            max_new_tokens: p.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS) as usize,
            eos_token_id: if p.ignore_eos { None } else { eos },
            stop_token_ids: p.stop_token_ids.clone(),
        },
        stop_sequences: p.stop.clone(),
        layout: match p.prompt_layout() {
            pb::PromptLayout::Aligned => PromptLayout::Aligned,
            pb::PromptLayout::Reference | pb::PromptLayout::Unspecified => PromptLayout::Reference,
        },
    }
}

fn to_proto(layout: PromptLayout) -> pb::PromptLayout {
    match layout {
        PromptLayout::Reference => pb::PromptLayout::Reference,
        PromptLayout::Aligned => pb::PromptLayout::Aligned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_defaults_once_and_keeps_what_was_set() {
        let given = GenerationParameters { temperature: Some(0.7), stop: vec!["".into(), "\n\n".into()], ..Default::default() };
        let v = validate(&given, 100, PromptLayout::Reference).unwrap();
        let want = GenerationParameters {
            max_new_tokens: Some(64),
            temperature: Some(0.7),
            top_k: Some(0),
            top_p: Some(1.0),
            repetition_penalty: Some(1.0),
            seed: Some(0),
            stop: vec!["\n\n".into()],
            stop_token_ids: vec![],
            ignore_eos: false,
            prompt_layout: pb::PromptLayout::Reference as i32,
        };
        assert_eq!(v, want);
        assert_eq!(validate(&v, 100, PromptLayout::Aligned).unwrap(), v);
        // The deployment's layout fills an unset one only.
        assert_eq!(validate(&given, 100, PromptLayout::Aligned).unwrap().prompt_layout(), pb::PromptLayout::Aligned);
        assert_eq!(resolve(&validate(&given, 100, PromptLayout::Aligned).unwrap(), None).layout, PromptLayout::Aligned);
        // What the store keeps round-trips through its JSON.
        assert_eq!(serde_json::from_str::<GenerationParameters>(&serde_json::to_string(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn refuses_out_of_range_values_naming_the_field() {
        let e = |p: GenerationParameters| validate(&p, 100, PromptLayout::Reference).unwrap_err().message().to_string();
        assert_eq!(e(GenerationParameters { max_new_tokens: Some(0), ..Default::default() }), "max_new_tokens must be at least 1");
        assert_eq!(
            e(GenerationParameters { stop_token_ids: vec![5, 100], ..Default::default() }),
            "stop_token_ids: token id 100 is out of range (vocab size 100)"
        );
        assert!(e(GenerationParameters { temperature: Some(-1.0), ..Default::default() }).contains("temperature"));
        assert!(e(GenerationParameters { top_p: Some(0.0), ..Default::default() }).contains("top_p"));
        assert_eq!(
            e(GenerationParameters { prompt_layout: 7, ..Default::default() }),
            "prompt_layout: unknown value 7 (1: reference, 2: aligned, 0: the server's default)"
        );
    }
}
