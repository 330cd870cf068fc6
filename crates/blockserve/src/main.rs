//! `blockserve`: one command for the whole project. Today it runs models directly
//! (logits, generate, init); the serving tiers join it as subcommands.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "blockserve", version, about = "Serve Block Transformer (global-to-local) language models", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Full forward pass over given token ids; writes logits (and contexts) as safetensors.
    Logits(commands::logits::Args),
    /// Generate a continuation of one prompt and print it.
    Generate(commands::generate::Args),
    /// Write a random-weight model of a named preset (config.json + model.safetensors).
    Init(commands::init::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => commands::logits::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Init(a) => commands::init::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
