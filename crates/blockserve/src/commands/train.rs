//! `blockserve corpus` prepares a code corpus and its tokenizer;
//! `blockserve train` trains a model on it (see the `blockserve-train` crate).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blockserve_train::corpus::{self, Split};
use blockserve_train::optim::AdamWConfig;
use blockserve_train::trainer::{RunConfig, Trainer};
use blockserve_train::{bpe, shapes};
use blockserve_worker::model_args::{parse_device, parse_dtype};

#[derive(clap::Args, Debug)]
pub struct CorpusArgs {
    /// Directory whose `.py` files make the corpus (searched recursively;
    /// site-packages, dist-packages and __pycache__ are skipped), e.g. the
    /// output of `python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"`.
    #[arg(long, env = "BLOCKSERVE_CORPUS_ROOT")]
    root: PathBuf,
    /// Output directory: tokenizer.json, train.bin, valid.bin, corpus.tsv.
    #[arg(long)]
    out: PathBuf,
    /// BPE vocabulary size, end of text included.
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
}

pub fn corpus(a: CorpusArgs) -> Result<()> {
    let t0 = Instant::now();
    let c = corpus::collect(&a.root)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    std::fs::write(a.out.join("corpus.tsv"), c.manifest(&a.root))?;
    let texts = |s: Split| c.split(s).map(|f| f.text.as_str()).collect::<Vec<_>>();
    let (train, valid) = (texts(Split::Train), texts(Split::Valid));
    let bytes = |v: &[&str]| v.iter().map(|t| t.len()).sum::<usize>();
    eprintln!(
        "{} files kept ({} train, {} valid; {} duplicates, {} not UTF-8 dropped), {} + {} bytes",
        c.files.len(),
        train.len(),
        valid.len(),
        c.duplicates,
        c.not_utf8,
        bytes(&train),
        bytes(&valid)
    );
    let json = bpe::train(train.iter().copied(), a.vocab_size)?;
    std::fs::write(a.out.join("tokenizer.json"), &json)?;
    eprintln!("trained a {}-entry BPE in {:.1} s", a.vocab_size, t0.elapsed().as_secs_f64());
    for (name, texts) in [("train", &train), ("valid", &valid)] {
        let ids = bpe::encode(&json, texts.iter().copied())?;
        bpe::write_tokens(&a.out.join(format!("{name}.bin")), &ids)?;
        println!("{name}: {} files, {} bytes, {} tokens ({:.2} bytes/token)", texts.len(), bytes(texts), ids.len(), bytes(texts) as f64 / ids.len() as f64);
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Corpus directory written by `blockserve corpus`.
    #[arg(long, env = "BLOCKSERVE_TRAIN_DATA")]
    data: PathBuf,
    /// Run directory: the checkpoint (`checkpoint/`) and the log (`log.jsonl`).
    /// A run directory that holds a checkpoint is resumed with its own
    /// settings; the flags below then only set the time limit and export.
    #[arg(long)]
    run: PathBuf,
    /// Model shape: vanilla_s, vanilla_LxD (L layers of width D, D a multiple
    /// of 32, e.g. vanilla_2x128), a model preset (block_main_b4_5,
    /// block_main_b4_19, vanilla_70, ...) or a test shape (tiny_block,
    /// tiny_vanilla); the vocabulary is the tokenizer's.
    #[arg(long, default_value = "block_main_b4_5")]
    shape: String,
    /// Tokens per training window (a multiple of the block length).
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Windows per micro-step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Micro-steps per update (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accum: u32,
    /// Updates in the whole run (the schedule's length).
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine decay.
    #[arg(long, default_value_t = 1e-4)]
    min_lr: f64,
    /// Linear warm-up updates.
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// Decoupled weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Largest global gradient norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    /// Seed of the initial weights and of the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "BLOCKSERVE_DEVICE", default_value = "cpu")]
    device: String,
    /// Compute dtype: f32 or bf16 (weights and optimizer stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Held-out loss every this many updates.
    #[arg(long, default_value_t = 200)]
    eval_every: u64,
    /// Held-out windows per evaluation (the first ones of valid.bin).
    #[arg(long, default_value_t = 256)]
    eval_windows: usize,
    /// A progress line every this many updates.
    #[arg(long, default_value_t = 20)]
    log_every: u64,
    /// Checkpoint every this many updates (and always when stopping).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Stop (with a checkpoint) after this many minutes; 0 = no limit. Run
    /// again with the same --run to continue.
    #[arg(long, default_value_t = 0.0)]
    max_minutes: f64,
    /// When the run completes, write a servable model directory here
    /// (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    export: Option<PathBuf>,
    /// dtype of the exported weights.
    #[arg(long, default_value = "bf16")]
    export_dtype: String,
}

fn read_tokens(data: &Path, name: &str) -> Result<Vec<u16>> {
    let path = data.join(name);
    bpe::read_tokens(&path).with_context(|| format!("{}: run `blockserve corpus` first", path.display()))
}

pub fn train(a: TrainArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let tokenizer = std::fs::read_to_string(a.data.join("tokenizer.json")).with_context(|| format!("{}/tokenizer.json", a.data.display()))?;
    let vocab = blockserve_text::Tokenizer::from_json(&tokenizer)?.vocab_size();
    let (train_ids, valid_ids) = (read_tokens(&a.data, "train.bin")?, read_tokens(&a.data, "valid.bin")?);
    let ckpt = a.run.join("checkpoint");
    let mut t = if ckpt.join("state.json").exists() {
        let t = Trainer::resume(&ckpt, train_ids, &valid_ids, &device)?;
        eprintln!("resuming {} at update {} of {}", a.run.display(), t.step, t.config.steps);
        t
    } else {
        let model = shapes::shape(&a.shape, vocab)?;
        let optim = AdamWConfig {
            lr: a.lr,
            min_lr: a.min_lr,
            warmup_steps: a.warmup_steps,
            total_steps: a.steps,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: 1e-8,
            weight_decay: a.weight_decay,
            clip: a.clip,
        };
        let config = RunConfig {
            shape: a.shape.clone(),
            model: serde_json::from_str(&model.to_json())?,
            seq_len: a.seq_len,
            batch: a.batch,
            accum: a.accum,
            steps: a.steps,
            optim,
            seed: a.seed,
            compute_dtype: a.dtype.clone(),
            eval_every: a.eval_every,
            eval_windows: a.eval_windows,
        };
        std::fs::create_dir_all(&a.run)?;
        Trainer::new(config, model, train_ids, &valid_ids, &device)?
    };
    let (body, total) = shapes::parameter_counts(t.model_config());
    eprintln!(
        "{}: {} parameters ({} non-embedding), {} training tokens, {} tokens per update, on {:?} in {}",
        t.config.shape,
        total,
        body,
        train_tokens(&a.data)?,
        t.config.batch * t.config.seq_len * t.config.accum as usize,
        device,
        t.config.compute_dtype
    );
    let started = Instant::now();
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(a.run.join("log.jsonl"))?;
    let steps = t.config.steps;
    while t.step < steps {
        let line = t.train_step()?;
        let last = t.step == steps;
        let out_of_time = a.max_minutes > 0.0 && started.elapsed().as_secs_f64() > a.max_minutes * 60.0;
        if t.step % t.config.eval_every == 0 || last {
            let v = t.eval()?;
            t.record_eval(v);
            println!("update {}/{steps}: held-out loss {v:.4} (perplexity {:.2})", t.step, v.exp());
        }
        if t.step % a.log_every == 0 || last {
            println!(
                "update {}/{steps}: loss {:.4} lr {:.2e} grad norm {:.3} {:.0} tokens/s, {:.0} s",
                t.step,
                line.loss,
                line.lr,
                line.grad_norm,
                line.tokens_per_s,
                started.elapsed().as_secs_f64()
            );
        }
        use std::io::Write;
        writeln!(log, "{}", serde_json::to_string(t.log.last().expect("a step was logged"))?)?;
        if t.step % a.checkpoint_every == 0 || last || out_of_time {
            t.save_checkpoint(&ckpt)?;
        }
        if out_of_time && !last {
            println!("stopped at update {} after {:.1} min; run again with --run {} to continue", t.step, a.max_minutes, a.run.display());
            return Ok(());
        }
    }
    if let Some(dir) = &a.export {
        t.export(dir, parse_dtype(&a.export_dtype)?, &tokenizer)?;
        println!("exported {} to {}", t.config.shape, dir.display());
    }
    Ok(())
}

fn train_tokens(data: &Path) -> Result<u64> {
    let path = data.join("train.bin");
    let n = std::fs::metadata(&path).with_context(|| path.display().to_string())?.len();
    if n % 2 != 0 {
        bail!("{}: not a file of u16 ids", path.display());
    }
    Ok(n / 2)
}
