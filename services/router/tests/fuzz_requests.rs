//! Property tests of the public request path (a bounded fuzz that runs in CI):
//! arbitrary bytes decoded as requests, and arbitrary well-formed requests with
//! hostile values (any unicode text, ids past the vocabulary, NaN and infinite
//! floats, huge lengths), go through the router's validation with the bundled
//! model's tokenizer. Every one is accepted or refused with a gRPC status
//! whose message names a field; none panics.

use blockserve_proto::v1::*;
use blockserve_router::validate;
use blockserve_runtime::params;
use blockserve_text::Tokenizer;
use proptest::prelude::*;
use prost::Message;

const VOCAB: usize = 8192;

/// The bundled model's tokenizer, loaded once.
fn tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::LazyLock<Tokenizer> = std::sync::LazyLock::new(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/code-block");
        Tokenizer::from_dir(&dir).unwrap().expect("the bundled model has a tokenizer")
    });
    &TOK
}

/// What the router does with a Generate request before it routes it.
fn check(req: &GenerateRequest, tok: &Tokenizer) -> Result<(), tonic::Status> {
    if !req.session_id.is_empty() {
        validate::session_id(&req.session_id)?;
    }
    let prompt = validate::prompt_ids(validate::generate_prompt(req)?, Some(tok), limits(tok))?;
    let p = params::validate(&req.parameters.clone().unwrap_or_default(), VOCAB, blockserve_config::PromptLayout::Reference)?;
    validate::lengths(prompt.len(), p.max_new_tokens.unwrap() as usize, 1024, 2048 * 4)
}

fn limits(tok: &Tokenizer) -> validate::PromptLimits {
    validate::PromptLimits::new(VOCAB, 2048 * 4, Some(tok))
}

fn assert_status(r: Result<(), tonic::Status>) {
    if let Err(s) = r {
        assert_ne!(s.code(), tonic::Code::Ok);
        assert!(!s.message().is_empty(), "a refusal without a message");
        assert!(matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::FailedPrecondition), "{s:?}");
    }
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY), Just(0.0), Just(-1.0), any::<f32>(), 0.0f32..2.0]
}

prop_compose! {
    fn parameters()(
        max_new_tokens in proptest::option::of(prop_oneof![Just(0u32), Just(u32::MAX), 0u32..5000]),
        temperature in proptest::option::of(float()),
        top_k in proptest::option::of(any::<u32>()),
        top_p in proptest::option::of(float()),
        repetition_penalty in proptest::option::of(float()),
        seed in proptest::option::of(any::<u64>()),
        stop in proptest::collection::vec(".{0,8}", 0..4),
        stop_token_ids in proptest::collection::vec(any::<u32>(), 0..4),
        ignore_eos in any::<bool>(),
        prompt_layout in prop_oneof![0i32..3, any::<i32>()],
    ) -> GenerationParameters {
        GenerationParameters { max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stop_token_ids, ignore_eos, prompt_layout }
    }
}

fn prompt() -> impl Strategy<Value = Option<generate_request::Prompt>> {
    prop_oneof![
        Just(None),
        "\\PC{0,64}".prop_map(|t| Some(generate_request::Prompt::Text(t))),
        any::<String>().prop_map(|t| Some(generate_request::Prompt::Text(t))),
        proptest::collection::vec(prop_oneof![0u32..VOCAB as u32, any::<u32>()], 0..64)
            .prop_map(|ids| Some(generate_request::Prompt::TokenIds(TokenIds { ids }))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_fail_and_any_request_gets_a_status(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let tok = tokenizer();
        if let Ok(req) = GenerateRequest::decode(&bytes[..]) {
            assert_status(check(&req, tok));
        }
        if let Ok(req) = ScoreRequest::decode(&bytes[..]) {
            let r = validate::score_input(&req.input).and_then(|p| validate::prompt_ids(p, Some(tok), limits(tok))).map(|_| ());
            assert_status(r);
        }
    }

    #[test]
    fn hostile_field_values_get_a_status(prompt in prompt(), parameters in proptest::option::of(parameters()), session_id in ".{0,80}") {
        let tok = tokenizer();
        let req = GenerateRequest { prompt, parameters, session_id };
        assert_status(check(&req, tok));
    }
}
