//! `blockserve client`: call a running router.

use std::io::Write;

use anyhow::{bail, Result};
use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::{generate_request, generate_response, FinishReason, GenerateRequest, GenerationParameters, TokenIds};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Stream a generation: text to stdout (token ids with --ids or without a tokenizer).
    Generate(GenerateArgs),
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Prompt text (tokenized by the router).
    text: Option<String>,
    /// Prompt token ids instead of text, comma separated.
    #[arg(long, value_delimiter = ',')]
    token_ids: Vec<u32>,
    /// Router endpoint.
    #[arg(long, env = "BLOCKSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
    /// Bearer token for a router started with --api-token.
    #[arg(long, env = "BLOCKSERVE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Print token ids (one chunk a line) instead of text.
    #[arg(long)]
    ids: bool,
    /// TLS for an https:// --addr.
    #[command(flatten)]
    tls: blockserve_runtime::tls::DialTlsArgs,
}

pub async fn run(cmd: Command) -> Result<()> {
    let Command::Generate(a) = cmd;
    let prompt = match (&a.text, a.token_ids.is_empty()) {
        (Some(t), true) => generate_request::Prompt::Text(t.clone()),
        (None, false) => generate_request::Prompt::TokenIds(TokenIds { ids: a.token_ids.clone() }),
        _ => bail!("give either prompt text or --token-ids"),
    };
    let dialer = blockserve_runtime::tls::Dialer::from_args(&a.tls)?;
    let channel = dialer.endpoint(&a.addr)?.connect().await.map_err(|e| anyhow::anyhow!("{}: {}", a.addr, blockserve_runtime::status::source_chain(&e)))?;
    let mut client = GenerationClient::new(channel);
    let req = GenerateRequest {
        prompt: Some(prompt),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(a.max_new_tokens),
            temperature: Some(a.sampling.temperature),
            top_k: (a.sampling.top_k > 0).then_some(a.sampling.top_k),
            top_p: (a.sampling.top_p < 1.0).then_some(a.sampling.top_p),
            repetition_penalty: (a.sampling.repetition_penalty != 1.0).then_some(a.sampling.repetition_penalty),
            seed: Some(a.sampling.seed),
            ..Default::default()
        }),
        session_id: String::new(),
    };
    let mut req = tonic::Request::new(req);
    if let Some(token) = &a.api_token {
        let value = format!("Bearer {token}").parse().map_err(|_| anyhow::anyhow!("--api-token: not a valid header value"))?;
        req.metadata_mut().insert("authorization", value);
    }
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(generate_response::Event::Tokens(c)) => {
                if a.ids || c.text.is_empty() && !c.token_ids.is_empty() && a.text.is_none() {
                    writeln!(out, "{:?}", c.token_ids)?;
                } else {
                    write!(out, "{}", c.text)?;
                }
                out.flush()?;
            }
            Some(generate_response::Event::Finished(f)) => {
                let reason = FinishReason::try_from(f.reason).map(|r| r.as_str_name()).unwrap_or("?");
                let u = f.usage.unwrap_or_default();
                let t = f.timings.unwrap_or_default();
                writeln!(out)?;
                eprintln!(
                    "[{} | {} prompt + {} generated tokens | first token {:.1} ms, total {:.1} ms | session {}]",
                    reason, u.prompt_tokens, u.generated_tokens, t.time_to_first_token_ms, t.total_ms, msg.session_id
                );
            }
            _ => {}
        }
    }
    Ok(())
}
