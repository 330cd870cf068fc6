//! The trainer on CPU: gradients against finite differences, the loss falling
//! on a tiny corpus, and a checkpoint that resumes the same loss curve.

use blockserve_train::optim::AdamWConfig;
use blockserve_train::shapes::shape;
use blockserve_train::trainer::{RunConfig, Trainer};
use blockserve_train::{bpe, data};
use candle_core::{Device, Tensor};

fn run_config(shape_name: &str, vocab: usize, seq_len: usize, batch: usize, steps: u64, dtype: &str) -> (RunConfig, blockserve_model::ModelConfig) {
    let model = shape(shape_name, vocab).unwrap();
    let optim = AdamWConfig { lr: 1e-2, min_lr: 1e-3, warmup_steps: 3, total_steps: steps, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, clip: 1.0 };
    let config = RunConfig {
        shape: shape_name.into(),
        model: serde_json::from_str(&model.to_json()).unwrap(),
        seq_len,
        batch,
        accum: 2,
        steps,
        optim,
        seed: 7,
        compute_dtype: dtype.into(),
        eval_every: 10,
        eval_windows: 4,
    };
    (config, model)
}

/// A few kilobytes of Python-like text, tokenized with a small BPE trained on it.
fn tiny_corpus() -> (String, Vec<u16>) {
    let mut text = String::new();
    for i in 0..60 {
        text += &format!("def f{i}(x):\n    return x * {i} + {}\n\n", i % 7);
    }
    let json = bpe::train(std::iter::once(text.as_str()), 300).unwrap();
    let ids = bpe::encode(&json, std::iter::once(text.as_str())).unwrap();
    (json, ids)
}

#[test]
fn gradients_match_finite_differences() {
    // Every parameter tensor: the block model's embedder, two one-layer stacks
    // (12 tensors a layer, 2 for the final norm), the token decoder's input
    // table, head and expansion layer; the vanilla model's one stack and tables.
    for (shape_name, tensors) in [("tiny_block", 33), ("tiny_vanilla", 16)] {
        let vocab = 40;
        let tokens: Vec<u16> = (0..400u32).map(|i| ((i * 7 + i / 5) % vocab) as u16).collect();
        let (config, model) = run_config(shape_name, vocab as usize, 8, 2, 10, "f64");
        let trainer = Trainer::new(config, model, tokens.clone(), &tokens, &Device::Cpu).unwrap();
        let rows = data::Batches::new(tokens, 8, 2, 3).unwrap().batch(0, 0);
        let (_, grads) = trainer.gradients(std::slice::from_ref(&rows)).unwrap();
        let mut checked = 0;
        for (i, (name, var)) in trainer.params().iter().enumerate() {
            let g = grads[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The entry with the largest gradient (an entry the batch uses).
            let k = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let at = |delta: f32| -> (f64, f64) {
                let mut w = base.clone();
                w[k] += delta;
                let actual = w[k] as f64 - base[k] as f64;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
                (trainer.batch_loss(&rows).unwrap(), actual)
            };
            let (plus, dp) = at(1e-3);
            let (minus, dm) = at(-1e-3);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
            let fd = (plus - minus) / (dp - dm);
            let err = (g[k] as f64 - fd).abs();
            assert!(err <= 1e-5 + 1e-3 * fd.abs(), "{shape_name} {name}[{k}]: backward {} vs finite difference {fd}", g[k]);
            checked += 1;
        }
        assert_eq!(checked, tensors, "{shape_name}");
    }
}

#[test]
fn loss_falls_on_a_tiny_corpus() {
    let (_, ids) = tiny_corpus();
    for shape_name in ["tiny_block", "tiny_vanilla"] {
        let (config, model) = run_config(shape_name, 300, 32, 8, 40, "f32");
        let mut t = Trainer::new(config, model, ids.clone(), &ids, &Device::Cpu).unwrap();
        let first = t.train_step().unwrap().loss;
        let before = t.eval().unwrap();
        for _ in 1..40 {
            t.train_step().unwrap();
        }
        let after = t.eval().unwrap();
        let last = t.log.last().unwrap().loss;
        // ln(300) = 5.70 nats at random; 40 steps must take off at least 2.5.
        assert!((first - 300f64.ln()).abs() < 0.3, "{shape_name}: first loss {first}");
        assert!(after < before - 2.5, "{shape_name}: held-out loss {before} -> {after}");
        assert!(last < first - 2.5, "{shape_name}: training loss {first} -> {last}");
    }
}

#[test]
fn a_resumed_checkpoint_continues_the_same_loss_curve() {
    let (_, ids) = tiny_corpus();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint");
    let (config, model) = run_config("tiny_block", 300, 32, 4, 8, "f32");
    let mut whole = Trainer::new(config.clone(), model.clone(), ids.clone(), &ids, &Device::Cpu).unwrap();
    for _ in 0..8 {
        whole.train_step().unwrap();
    }
    let mut first = Trainer::new(config, model, ids.clone(), &ids, &Device::Cpu).unwrap();
    for _ in 0..4 {
        first.train_step().unwrap();
    }
    first.save_checkpoint(&ckpt).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, ids.clone(), &ids, &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 4);
    for _ in 0..4 {
        resumed.train_step().unwrap();
    }
    let losses = |t: &Trainer| t.log.iter().map(|l| (l.step, l.loss, l.grad_norm)).collect::<Vec<_>>();
    assert_eq!(losses(&resumed), losses(&whole));
    for ((n, a), (_, b)) in resumed.params().iter().zip(whole.params()) {
        let d = (a.as_tensor() - b.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{n} differs after resuming");
    }
}
