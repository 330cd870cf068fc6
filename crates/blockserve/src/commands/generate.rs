//! `blockserve generate`: one prompt in, token ids out, through the same
//! incremental API the serving tiers use.

use anyhow::{bail, Result};
use blockserve_model::{GenerationRequest, PromptLayout, StopCriteria};

use blockserve_worker::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    /// How a Block Transformer cuts the prompt into blocks: reference
    /// (left-padded with id 0 to whole blocks, as the reference
    /// implementation does) or aligned (blocks from the first token; the last
    /// partial block starts the first generated one).
    #[arg(long, default_value_t = PromptLayout::Reference)]
    prompt_layout: PromptLayout,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
    /// Extra token ids that end generation (kept in the output), comma separated.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Do not stop at the model's end-of-sequence id.
    #[arg(long)]
    ignore_eos: bool,
    /// Print `{"tokens": [...], "finish_reason": "..."}` instead of plain text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let sampling = args.sampling.params();
    let eos = if args.ignore_eos { None } else { model.config().eos_token_id() };
    let req = GenerationRequest {
        prompt: args.prompt_ids,
        sampling,
        stop: StopCriteria { max_new_tokens: args.max_new_tokens, eos_token_id: eos, stop_token_ids: args.stop_token_ids },
        layout: args.prompt_layout,
    };
    let Some(out) = model.generate(&[req], false)?.pop() else { bail!("no output") };
    if args.json {
        println!("{}", serde_json::json!({ "tokens": out.tokens, "finish_reason": out.finish_reason.as_str() }));
    } else {
        let ids: Vec<String> = out.tokens.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
        eprintln!("finish_reason: {}", out.finish_reason.as_str());
    }
    Ok(())
}
