"""GPU benchmark: QLoRA training and the inference loop on the real Llama-3-8B architecture.

Builds a randomly initialised `LlamaForSequenceClassification` with Llama-3-8B's shapes (hidden 4096,
32 layers, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256) on the GPU, no download, quantises every
linear layer of the body to 4-bit NF4 (double quantisation; the classification head stays in full
precision) and times, on the same 4-bit base, side by side:

  (a) the recipe's settings, written plainly with peft: LoRA r 16, alpha 8, q/k/v/o on every layer; batch
      8 in file order padded to the batch's longest; eager attention; `prepare_model_for_kbit_training`'s
      default gradient checkpointing (reentrant); inference in file order, 32 per batch;
  (b) llmclf's defaults, through llmclf's own code (`llmclf.config` defaults, `model.loading.add_lora`,
      `layer_cache`, `training.init_head_from_probe`): LoRA on every linear layer of the top fifth of
      the layers (7 of 32), r/alpha/lr/batch from `llmclf.config`; the frozen lower 25 layers run once
      per training text into the bf16 activation cache; the head starts from a linear probe on the cached
      features; training steps run the top 7 layers on length-grouped batches (the Trainer's
      `get_length_grouped_indices`); SDPA (FlashAttention-2 when flash-attn is installed); no gradient
      checkpointing. (b)'s training time counts the cache and the probe: it is the cost of one epoch.
      Inference: the whole model (as `llmclf predict`), texts sorted by length, batches of `auto` size
      (on a GPU as many texts as fit 16,384 padded tokens; 32 on CPU).

Both use bf16 compute (autocast; NF4 matmuls in bf16) and the class-weighted cross-entropy, on the same
synthetic texts: token ids whose lengths follow a log-normal spread around ~45 tokens (like AG News),
capped at 512. Prints samples/s, real (non-pad) tokens/s, padding share and peak GPU memory per phase,
and the ratios (b)/(a). Random weights give the real compute and memory cost, not meaningful predictions.

    python benchmarks/gpu.py            # one H100: a few minutes, inside the 5-minute budget
    python benchmarks/gpu.py --tiny     # 2 layers, hidden 64, on CPU: a smoke test (tests/test_benchmarks.py)

Run from a checkout (`src/` is put on the path when llmclf is not installed) or with llmclf installed.
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
import sys
import time
from pathlib import Path
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
RECIPE_LORA = {
    "r": 16,
    "lora_alpha": 8,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
RECIPE_LR, RECIPE_BATCH = 1e-4, 8
CLASS_WEIGHTS = [1.0, 0.8, 1.2, 1.0]


def import_llmclf() -> None:
    """(b) runs llmclf's own code: from an installed llmclf, else from this checkout's `src/`."""
    if importlib.util.find_spec("llmclf") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


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


def random_ids(lengths: list[int], rng: np.random.Generator, vocab: int, pad_id: int) -> list[list[int]]:
    return [rng.integers(0, pad_id, size=n).tolist() for n in lengths]


def make_batch(ids: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids padded (right) to the batch's longest, with the attention mask."""
    width = max(len(row) for row in ids)
    batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        batch[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return {"input_ids": batch.to(device), "attention_mask": mask.to(device)}


def phase_result(samples: int, tokens: int, padded: int, seconds: float, device: torch.device) -> dict:
    return {
        "samples_s": samples / seconds,
        "tokens_s": tokens / seconds,
        "pad_share": 1 - tokens / padded if padded else 0.0,
        "peak_gib": peak_gib(device),
        "seconds": seconds,
    }


def train_recipe(
    model: Any, texts: list[list[int]], labels: np.ndarray, warm: list[list[int]], env: dict
) -> dict:
    """The recipe's epoch: batches of 8 in the given (shuffled) order, forward + weighted CE + backward +
    AdamW; one untimed batch (`warm`) first."""
    device, dtype = env["device"], env["dtype"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=RECIPE_LR, weight_decay=0.01)
    weight = torch.tensor(CLASS_WEIGHTS, device=device)
    model.train()

    def step(ids: list[list[int]], y: np.ndarray) -> float:
        with autocast(device, dtype):
            logits = model(**make_batch(ids, env["pad_id"], device)).logits
        loss = F.cross_entropy(logits.float(), torch.from_numpy(y).to(device), weight=weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(warm, np.zeros(len(warm), dtype=np.int64))
    sync(device)
    reset_peak(device)
    started = time.perf_counter()
    tokens = padded = 0
    for begin in range(0, len(texts), RECIPE_BATCH):
        ids = texts[begin : begin + RECIPE_BATCH]
        loss = step(ids, labels[begin : begin + RECIPE_BATCH])
        tokens += sum(len(row) for row in ids)
        padded += max(len(row) for row in ids) * len(ids)
    sync(device)
    result = phase_result(len(texts), tokens, padded, time.perf_counter() - started, device)
    return {**result, "loss": loss}


def train_llmclf(
    model: Any, texts: list[list[int]], labels: np.ndarray, warm: list[list[int]], env: dict, defaults: Any
) -> dict:
    """llmclf's epoch: lower layers once into the activation cache, the probe head, then training steps on
    the top layers over length-grouped batches. One untimed round on `warm` first (kernels, allocator)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from llmclf.model.layer_cache import ActivationCache, logits_from_states, pooled_features
    from llmclf.training.probe import init_head_from_probe

    device, dtype, start = env["device"], env["dtype"], env["start_layer"]
    lc, tc = defaults
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    weight = torch.tensor(CLASS_WEIGHTS, device=device)

    def build(ids: list[list[int]]) -> ActivationCache:
        with autocast(device, dtype):
            return ActivationCache.build(
                model, ids, start, pad_id=env["pad_id"], batch_size=tc.eval_batch_size, dtype=torch.bfloat16
            )

    def step(cache: ActivationCache, index: list[int], y: np.ndarray) -> float:
        model.train()
        states, mask = cache.batch(index)  # (batch, longest, hidden) fp32 from the bf16 cache
        with autocast(device, dtype):
            logits = logits_from_states(model, states.to(device), mask.to(device), start)
        loss = F.cross_entropy(logits.float(), torch.from_numpy(y).to(device), weight=weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    warm_cache = build(warm)
    step(warm_cache, list(range(len(warm))), np.zeros(len(warm), dtype=np.int64))
    del warm_cache
    sync(device)
    reset_peak(device)
    started = time.perf_counter()
    cache = build(texts)
    sync(device)
    cached = time.perf_counter()
    with autocast(device, dtype):
        features = pooled_features(model, cache, list(range(len(texts))), batch_size=tc.eval_batch_size)
    init_head_from_probe(model, features, labels.tolist(), CLASS_WEIGHTS, seed=0)
    probed = time.perf_counter()
    lengths = [len(row) for row in texts]
    order = get_length_grouped_indices(lengths, tc.batch_size, generator=torch.Generator().manual_seed(0))
    tokens = padded = 0
    for begin in range(0, len(order), tc.batch_size):
        index = order[begin : begin + tc.batch_size]
        loss = step(cache, index, labels[index])
        tokens += sum(lengths[i] for i in index)
        padded += max(lengths[i] for i in index) * len(index)
    sync(device)
    ended = time.perf_counter()
    result = phase_result(len(texts), tokens, padded, ended - started, device)
    parts = {"cache_s": cached - started, "probe_s": probed - cached, "steps_s": ended - probed}
    return {**result, "loss": loss, **parts, "cache_mib": cache.nbytes / 2**20}


def infer_phase(model: Any, texts: list[list[int]], batches: list[np.ndarray], env: dict) -> dict:
    """Softmax probabilities for every text through the whole model, batch by batch as given; one
    untimed pass over the first batch first, for both settings alike."""
    device, dtype = env["device"], env["dtype"]
    lengths = np.array([len(row) for row in texts])
    model.eval()
    out = np.zeros((len(texts), NUM_LABELS))
    tokens = padded = 0
    with torch.inference_mode(), autocast(device, dtype):
        model(**make_batch([texts[i] for i in batches[0]], env["pad_id"], device))
        sync(device)
        reset_peak(device)
        started = time.perf_counter()
        for idx in batches:
            logits = model(**make_batch([texts[i] for i in idx], env["pad_id"], device)).logits
            out[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
            tokens += int(lengths[idx].sum())
            padded += int(lengths[idx].max()) * len(idx)
        sync(device)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-3), "every row scored"
    result = phase_result(len(texts), tokens, padded, time.perf_counter() - started, device)
    return {**result, "batches": len(batches)}


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
        "--train-rows", type=int, default=None, help="training texts, one epoch each (default 512; tiny 48)"
    )
    p.add_argument("--infer-rows", type=int, default=None, help="texts to score (default 2000; tiny 64)")
    p.add_argument(
        "--recipe-eval-batch-size", type=int, default=32, help="the recipe's inference batch (default 32)"
    )
    p.add_argument("--median-tokens", type=float, default=40.0, help="median text length (mean ~1.13x)")
    p.add_argument("--max-length", type=int, default=512, help="length cap (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import_llmclf()
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    from llmclf.batches import length_batches
    from llmclf.config import LoraSettings, TrainConfig
    from llmclf.model.anatomy import check_layers, resolve_top_layers
    from llmclf.model.loading import add_lora

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("No CUDA GPU: the full-size benchmark needs one. Use --tiny for the CPU smoke test.")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    shape = TINY if args.tiny else LLAMA3_8B
    rows = args.train_rows or (48 if args.tiny else 512)
    infer_rows = args.infer_rows or (64 if args.tiny else 2000)
    pad_id = shape["vocab_size"] - 1
    env: dict[str, Any] = {"device": device, "dtype": dtype, "pad_id": pad_id}
    torch.manual_seed(args.seed)

    # The same texts for both: the training set in a shuffled order (the Trainer shuffles), a separate
    # warm-up batch, and the texts to score.
    rng = np.random.default_rng(args.seed)
    vocab = shape["vocab_size"]
    train_lengths = synthetic_lengths(rows, rng, args.median_tokens, args.max_length)
    texts = random_ids(train_lengths.tolist(), rng, vocab, pad_id)
    labels = rng.integers(0, NUM_LABELS, size=rows)
    warm = random_ids(
        synthetic_lengths(16, rng, args.median_tokens, args.max_length).tolist(), rng, vocab, pad_id
    )
    infer_lengths = synthetic_lengths(infer_rows, rng, args.median_tokens, args.max_length)
    infer_texts = random_ids(infer_lengths.tolist(), rng, vocab, pad_id)
    recipe_batch = args.recipe_eval_batch_size
    file_order = [np.arange(i, min(i + recipe_batch, infer_rows)) for i in range(0, infer_rows, recipe_batch)]

    started = time.perf_counter()
    base, n_quantized = build_model(shape, device, dtype, pad_id)
    built = time.perf_counter() - started
    # prepare_model_for_kbit_training as both do (upcasts the non-quantised weights to fp32); gradient
    # checkpointing is switched per setting below.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    has_flash = importlib.util.find_spec("flash_attn") is not None and cuda and dtype != torch.float32
    fast_attn = "flash_attention_2" if has_flash else "sdpa"
    lc, tc = LoraSettings(), TrainConfig()
    results: dict[str, Any] = {}

    # (a) the recipe.
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, **RECIPE_LORA))
    model.get_base_model().set_attn_implementation("eager")
    set_gradient_checkpointing(model, True, reentrant=True)
    results["a_recipe"] = {
        "settings": {
            "attn": "eager",
            "checkpointing": True,
            "lora": RECIPE_LORA,
            "lr": RECIPE_LR,
            "batch": RECIPE_BATCH,
            "sort": False,
            "eval_batch": recipe_batch,
        },
        "train": train_recipe(model, texts, labels, warm, env),
        "inference": infer_phase(model, infer_texts, file_order, env),
    }
    set_gradient_checkpointing(model, False, reentrant=True)
    base = model.unload()  # the 4-bit base without the recipe's adapter, for (b)
    del model
    if cuda:
        torch.cuda.empty_cache()

    # (b) llmclf's defaults, through its own functions.
    top = resolve_top_layers(base, lc.layers)
    model = add_lora(
        base, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets, seed=0, top_layers=top
    )
    env["start_layer"] = check_layers(model, top)
    try:
        model.get_base_model().set_attn_implementation(fast_attn)
    except (ValueError, ImportError) as exc:  # e.g. flash-attn present but refused here
        print(f"note: attention {fast_attn} unavailable ({exc}); using sdpa")
        fast_attn = "sdpa"
        model.get_base_model().set_attn_implementation("sdpa")
    results["b_llmclf"] = {
        "settings": {
            "attn": fast_attn,
            "checkpointing": False,
            "lora_layers": f"top {top} of {shape['num_hidden_layers']}",
            "lora_targets": lc.targets,
            "r": lc.r,
            "alpha": lc.alpha,
            "lr": tc.lr,
            "batch": tc.batch_size,
            "head_init": tc.head_init,
            "sort": True,
            "eval_batch": tc.eval_batch_size,
        },
        "train": train_llmclf(model, texts, labels, warm, env, (lc, tc)),
        # As `llmclf predict`: length-sorted batches, `auto` size (a token budget on a GPU).
        "inference": infer_phase(
            model, infer_texts, length_batches(infer_lengths, tc.eval_batch_size, device), env
        ),
    }

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "cuda": cuda,
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "Llama-3-8B",
        "quantized_linears": n_quantized,
        "build_s": built,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "train_rows": rows,
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
        f"{report['train_rows']} training texts, mean tokens: train {report['train_tokens_mean']:.1f}, "
        f"inference {report['infer_tokens_mean']:.1f}"
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
    b_train = res["b_llmclf"]["train"]
    print(
        f"b_llmclf's training epoch: cache {b_train['cache_s']:.1f} s ({b_train['cache_mib']:.0f} MiB), "
        f"probe {b_train['probe_s']:.1f} s, steps {b_train['steps_s']:.1f} s"
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
