"""GPU benchmark: QLoRA training steps and the inference loop on the real Llama-3-8B architecture.

Self-contained (torch + transformers + peft + bitsandbytes; no download, no llmclf import): builds a
randomly initialised `LlamaForSequenceClassification` with Llama-3-8B's shapes (hidden 4096, 32 layers,
32 heads, 8 KV heads, MLP 14336, vocabulary 128256), quantises every linear layer of the body to 4-bit
NF4 (double quantisation; the classification head stays in full precision), adds LoRA (r 16, alpha 8,
q/k/v/o) and times, on the same model, side by side:

  (a) the recipe's settings: 4-bit, batch 8 in file order padded to the batch's longest, eager
      attention, `prepare_model_for_kbit_training` defaults (gradient checkpointing on, reentrant);
      inference in file order, 32 per batch;
  (b) llmclf's defaults on a GPU: 4-bit, the same shuffled batches of 8 (the Trainer's dynamic padding),
      SDPA (FlashAttention-2 when flash-attn is installed), no gradient checkpointing; inference with
      texts sorted by length, `--eval-batch-size` (32, as `llmclf predict`) per batch.

Both use bf16 compute (autocast; NF4 matmuls in bf16) and the class-weighted cross-entropy. Inputs are
synthetic token ids whose lengths follow a log-normal spread around ~45 tokens (like ag_news), capped
at 512. Prints samples/s, real (non-pad) tokens/s, padding share and peak GPU memory per phase, and
the ratios (b)/(a). Random weights give the real compute and memory cost, not meaningful predictions.

    python benchmarks/gpu.py            # one H100: about 2 minutes, well under the 5-minute budget
    python benchmarks/gpu.py --tiny     # 2 layers, hidden 64, on CPU: a smoke test (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import platform
import resource
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}
NUM_LABELS = 4
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------------------------------ model
def quantize_linears(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Replace every linear layer but the head by a bitsandbytes NF4 Linear4bit, one at a time, so the
    full-precision copy of only one layer is alive beside the 4-bit model."""
    import bitsandbytes as bnb

    count = 0
    # Parents only: a list holding the Linear layers themselves would keep every bf16 copy alive.
    parents = [m for m in model.modules() if not isinstance(m, torch.nn.Linear)]
    for module in parents:
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "score":
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,  # double quantisation, as in llmclf and the recipe
                quant_type="nf4",
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            )
            q.weight = weight.to(device)  # quantises on the way
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(device), requires_grad=False)
            setattr(module, child_name, q)
            child.weight = None  # drop the bf16 copy now
            del child, weight
            count += 1
    return count


def build_model(shape: dict, device: torch.device, compute_dtype: torch.dtype, pad_id: int) -> Any:
    """Random Llama classifier in `compute_dtype` on `device`, body quantised to NF4, head full precision."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(**shape, num_labels=NUM_LABELS, pad_token_id=pad_id, use_cache=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device(device):  # initialised where it runs: no host copy of 16 GB
            model = LlamaForSequenceClassification(config)
    finally:
        torch.set_default_dtype(default)
    n = quantize_linears(model, device, compute_dtype)
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit load; peft reads it
    model.score.to(torch.float32)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model, n


# ------------------------------------------------------------------------------------------- data
def synthetic_lengths(n: int, rng: np.random.Generator, median: float, cap: int) -> np.ndarray:
    """Log-normal token counts (sigma 0.5: mean ~1.13 x median), at least 4, at most `cap`."""
    return np.clip(np.round(rng.lognormal(math.log(median), 0.5, size=n)), 4, cap).astype(int)


def make_batch(
    lengths: list[int], rng: np.random.Generator, vocab: int, pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Token ids padded (right) to the batch's longest, with the attention mask."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.from_numpy(rng.integers(0, pad_id, size=n))
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_phase(
    model: Any, batches: list[list[int]], warmup: int, args: Any, env: dict, rng: np.random.Generator
) -> dict:
    """Forward + class-weighted CE + backward + AdamW step per batch; the first `warmup` not timed."""
    device, dtype = env["device"], env["dtype"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    weight = torch.tensor([1.0, 0.8, 1.2, 1.0], device=device)
    model.train()
    samples = tokens = padded = 0
    reset_peak(device)
    for step, lengths in enumerate(batches):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        batch = make_batch(lengths, rng, env["vocab"], env["pad_id"], device)
        labels = torch.from_numpy(rng.integers(0, NUM_LABELS, size=len(lengths))).to(device)
        with autocast(device, dtype):
            logits = model(**batch).logits
        loss = F.cross_entropy(logits.float(), labels, weight=weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            samples += len(lengths)
            tokens += sum(lengths)
            padded += max(lengths) * len(lengths)
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "samples_s": samples / seconds,
        "tokens_s": tokens / seconds,
        "pad_share": 1 - tokens / padded,
        "peak_gib": peak_gib(device),
        "seconds": seconds,
        "loss": loss.item(),
    }


def infer_phase(model: Any, lengths: np.ndarray, batch_size: int, sort: bool, env: dict) -> dict:
    """Softmax probabilities for every row; sorted longest-first (llmclf) or in file order (recipe)."""
    device, dtype = env["device"], env["dtype"]
    rng = np.random.default_rng(1)
    order = np.argsort(lengths, kind="stable")[::-1] if sort else np.arange(len(lengths))
    model.eval()
    out = np.zeros((len(lengths), NUM_LABELS))
    tokens = padded = 0
    reset_peak(device)
    # One untimed batch of the longest rows: kernels compiled and the allocator warmed alike for both.
    with torch.inference_mode(), autocast(device, dtype):
        warm = np.sort(lengths)[::-1][:batch_size].tolist()
        model(**make_batch(warm, rng, env["vocab"], env["pad_id"], device))
        sync(device)
        started = time.perf_counter()
        for start in range(0, len(lengths), batch_size):
            idx = order[start : start + batch_size]
            batch_lengths = lengths[idx].tolist()
            logits = model(**make_batch(batch_lengths, rng, env["vocab"], env["pad_id"], device)).logits
            out[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
            tokens += sum(batch_lengths)
            padded += max(batch_lengths) * len(batch_lengths)
        sync(device)
    seconds = time.perf_counter() - started
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-3), "every row scored"
    return {
        "samples_s": len(lengths) / seconds,
        "tokens_s": tokens / seconds,
        "pad_share": 1 - tokens / padded,
        "peak_gib": peak_gib(device),
        "seconds": seconds,
    }


def set_gradient_checkpointing(model: Any, on: bool, reentrant: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad
    else:
        base.gradient_checkpointing_disable()
        if getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, on CPU: a quick smoke test")
    p.add_argument(
        "--train-steps", type=int, default=None, help="timed steps per setting (default 30; tiny 3)"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    p.add_argument("--infer-rows", type=int, default=None, help="texts to score (default 2000; tiny 64)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch (default 8, both settings)")
    p.add_argument("--recipe-eval-batch-size", type=int, default=32, help="recipe inference batch")
    p.add_argument("--eval-batch-size", type=int, default=32, help="llmclf inference batch (default 32)")
    p.add_argument("--median-tokens", type=float, default=40.0, help="median text length (mean ~1.13x)")
    p.add_argument("--max-length", type=int, default=512, help="length cap (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("No CUDA GPU: the full-size benchmark needs one. Use --tiny for the CPU smoke test.")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    shape = TINY if args.tiny else LLAMA3_8B
    steps = args.train_steps or (3 if args.tiny else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.tiny else 3)
    rows = args.infer_rows or (64 if args.tiny else 2000)
    pad_id = shape["vocab_size"] - 1
    env = {"device": device, "dtype": dtype, "vocab": shape["vocab_size"], "pad_id": pad_id}
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    model, n_quantized = build_model(shape, device, dtype, pad_id)
    built = time.perf_counter() - started
    # prepare_model_for_kbit_training as both do (upcasts the non-quantised weights to fp32); the
    # gradient checkpointing choice is switched per setting below.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=16, lora_alpha=8, lora_dropout=0.05, target_modules=LORA_TARGETS
    )
    model = get_peft_model(model, lora)
    has_flash = importlib.util.find_spec("flash_attn") is not None and cuda and dtype != torch.float32
    fast_attn = "flash_attention_2" if has_flash else "sdpa"

    rng = np.random.default_rng(args.seed)
    n_train = (warmup + steps) * args.batch_size
    train_lengths = synthetic_lengths(n_train, rng, args.median_tokens, args.max_length)
    batches = [
        train_lengths[i : i + args.batch_size].tolist() for i in range(0, n_train, args.batch_size)
    ]  # both settings see the same shuffled batches: the Trainer shuffles, it does not sort
    infer_lengths = synthetic_lengths(rows, rng, args.median_tokens, args.max_length)

    settings = {
        "a_recipe": {
            "attn": "eager",
            "checkpointing": True,
            "sort": False,
            "eval_batch": args.recipe_eval_batch_size,
        },
        "b_llmclf": {
            "attn": fast_attn,
            "checkpointing": False,
            "sort": True,
            "eval_batch": args.eval_batch_size,
        },
    }
    results: dict[str, Any] = {}
    for name, s in settings.items():
        try:
            model.get_base_model().set_attn_implementation(s["attn"])
        except (ValueError, ImportError) as exc:  # e.g. flash-attn present but refused here
            print(f"note: attention {s['attn']} unavailable ({exc}); using sdpa")
            s["attn"] = "sdpa"
            model.get_base_model().set_attn_implementation("sdpa")
        set_gradient_checkpointing(model, s["checkpointing"], reentrant=True)
        train = train_phase(model, batches, warmup, args, env, np.random.default_rng(args.seed + 1))
        infer = infer_phase(model, infer_lengths, s["eval_batch"], s["sort"], env)
        results[name] = {"settings": s, "train": train, "inference": infer}
        if cuda:
            torch.cuda.empty_cache()

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "cuda": cuda,
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "Llama-3-8B",
        "quantized_linears": n_quantized,
        "build_s": built,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "train_tokens_mean": float(train_lengths.mean()),
        "infer_tokens_mean": float(infer_lengths.mean()),
        "results": results,
        "total_s": time.perf_counter() - started,
    }
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return report


def print_report(report: dict) -> None:
    mem = "peak GPU GiB" if report["cuda"] else "peak RSS GiB"
    print(
        f"{report['shape']} classifier, {report['quantized_linears']} NF4 linears, compute "
        f"{report['compute_dtype']}, on {report['device']} (built in {report['build_s']:.0f} s); "
        f"mean tokens: train {report['train_tokens_mean']:.1f}, inference {report['infer_tokens_mean']:.1f}"
    )
    header = f"{'setting':<10} {'phase':<10} {'samples/s':>10} {'tokens/s':>10} {'padding':>8} {mem:>13}"
    print(header)
    print("-" * len(header))
    res = report["results"]
    for name, r in res.items():
        for phase in ("train", "inference"):
            m = r[phase]
            print(
                f"{name:<10} {phase:<10} {m['samples_s']:>10.1f} {m['tokens_s']:>10.0f} "
                f"{m['pad_share']:>8.1%} {m['peak_gib']:>13.2f}"
            )
    for phase in ("train", "inference"):
        a, b = res["a_recipe"][phase], res["b_llmclf"][phase]
        print(
            f"ratio b/a  {phase:<10} {b['samples_s'] / a['samples_s']:>9.2f}x "
            f"{'':>10} {'':>8} {b['peak_gib'] / a['peak_gib']:>12.2f}x"
        )
    print(f"total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
