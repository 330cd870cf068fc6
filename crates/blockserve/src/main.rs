//! `blockserve`: one command for the whole project: run models directly (logits,
//! generate, init), run the serving stack (up, or one tier per process), and call it.

mod commands;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: fewer cycles per allocation on the
/// per-message paths (glibc's bookkeeping was about 8% of a router's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "blockserve", version, about = "Serve Block Transformer (global-to-local) language models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole stack on loopback in one process and print the endpoint.
    Up(commands::up::Args),
    /// Call a running router.
    #[command(subcommand)]
    Client(commands::client::Command),
    /// Run the router tier (public Generation API).
    Router(commands::tiers::RouterArgs),
    /// Run a block-decoder tier instance.
    BlockDecoder(commands::tiers::BlockDecoderArgs),
    /// Run a token-decoder tier instance.
    TokenDecoder(commands::tiers::TokenDecoderArgs),
    /// Full forward pass over given token ids; writes logits (and contexts) as safetensors.
    Logits(commands::logits::Args),
    /// Generate a continuation of one prompt in this process and print it.
    Generate(commands::generate::Args),
    /// Benchmark the in-process engine on random weights (prints a table).
    Bench(commands::bench::Args),
    /// Write a random-weight model of a named preset (config.json + model.safetensors).
    Init(commands::init::Args),
    /// Prepare a training corpus: collect .py files, train a BPE tokenizer, write token files.
    Corpus(commands::train::CorpusArgs),
    /// Train a Block Transformer or vanilla model on a prepared corpus (resumable).
    Train(commands::train::TrainArgs),
    /// Held-out perplexity of a model over a token file (the Score RPC's scoring code).
    Perplexity(commands::perplexity::Args),
}

fn main() {
    let cli = Cli::parse();
    let service = match &cli.command {
        Command::Router(_) => "blockserve-router",
        Command::BlockDecoder(_) => "blockserve-block-decoder",
        Command::TokenDecoder(_) => "blockserve-token-decoder",
        Command::Up(_) => "blockserve-up",
        _ => "blockserve",
    };
    blockserve_runtime::telemetry::init(service);
    // The block decoder does no per-session work on its runtime: only its
    // links, which are the critical path between passes, so its workers run
    // at the engine's priority.
    let critical = matches!(cli.command, Command::BlockDecoder(_)).then_some("block-decoder-worker");
    let threads = match &cli.command {
        Command::Router(a) => a.args.serve.worker_threads.unwrap_or(blockserve_router::DEFAULT_WORKER_THREADS),
        Command::BlockDecoder(a) => a.args.serve.worker_threads.unwrap_or(blockserve_runtime::server::DEFAULT_WORKER_THREADS),
        Command::TokenDecoder(a) => a.args.serve.worker_threads.unwrap_or(blockserve_token_decoder::DEFAULT_WORKER_THREADS),
        Command::Up(a) => a.worker_threads,
        // Model commands and the client: the machine's cores.
        _ => std::thread::available_parallelism().map_or(4, |n| n.get()) as u16,
    };
    blockserve_runtime::server::runtime(threads, critical).block_on(run(cli));
}

async fn run(cli: Cli) {
    let result = match cli.command {
        Command::Up(a) => commands::up::run(a).await,
        Command::Client(c) => commands::client::run(c).await,
        Command::Router(a) => commands::tiers::router(a).await,
        Command::BlockDecoder(a) => commands::tiers::block_decoder(a).await,
        Command::TokenDecoder(a) => commands::tiers::token_decoder(a).await,
        Command::Logits(a) => commands::logits::run(a),
        Command::Corpus(a) => commands::train::corpus(a),
        Command::Train(a) => commands::train::train(a),
        Command::Perplexity(a) => commands::perplexity::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    blockserve_runtime::telemetry::shutdown();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
