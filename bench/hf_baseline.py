"""Hugging Face transformers baseline for `blockserve bench`: a random-weight
GPTNeoXForCausalLM of a Pythia shape, bf16, sdpa attention, `generate()` with EOS
disabled, in the reference's two settings. Prints the same table as blockserve.

    python3 bench/hf_baseline.py --preset vanilla_160 --setting decode-heavy --batch 256
"""
import argparse
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

SHAPES = {  # name: (hidden, layers, heads), Pythia shapes, vocab 50304
    "vanilla_70": (512, 6, 8),
    "vanilla_160": (768, 12, 12),
    "vanilla_410": (1024, 24, 16),
}
SETTINGS = {"prefill-heavy": (2048, 128), "decode-heavy": (128, 2048)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vanilla_160", choices=SHAPES)
    ap.add_argument("--setting", default="decode-heavy", choices=SETTINGS)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--gen-len", type=int)
    ap.add_argument("--no-warmup", action="store_true", help="time the process's first full-size generate() (understates transformers)")
    args = ap.parse_args()
    p, g = SETTINGS[args.setting]
    p, g = args.prompt_len or p, args.gen_len or g
    hidden, layers, heads = SHAPES[args.preset]
    cfg = GPTNeoXConfig(
        vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048 + 128,
        layer_norm_eps=1e-5, use_parallel_residual=True, hidden_act="gelu", bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    name = torch.cuda.get_device_name()
    print(f"transformers baseline {args.preset} on {name}, torch {torch.__version__}")
    print("| preset | device | dtype | prompt | generate | batch | wall s | tokens/s | peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for b in args.batch:
        ids = torch.randint(1, 50304, (b, p), device="cuda")
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            # A full-size warm-up: transformers' first full-length generate() in
            # a process is 2-3x slower than the next (a short warm-up is not
            # enough), so timing the first call understates transformers.
            if not args.no_warmup:
                t = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=g, min_new_tokens=g, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                print(f"warm-up (same size, not timed): {time.perf_counter() - t:.1f} s", flush=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=g, min_new_tokens=g, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        gen = (out.shape[1] - p) * b
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| hf {args.preset} | {name} | bf16 | {p} | {g} | {b} | {wall:.2f} | {gen / wall:.0f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
