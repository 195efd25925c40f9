"""This machine's limits for the builtin model: matmul FLOP/s, memory bandwidth, and the token
rates they allow for prefill, decode and LoRA training.

    .venv/bin/python bench/roofline.py [--model smollm2-135m-instruct] [--out bench/results/roofline.json]

Measured with torch's default thread count, best of a few runs (about 10 s in all):
- fp32 and bf16 `torch.mm` FLOP/s on the model's MLP shape, (B x hidden) @ (hidden x
  intermediate) for B from 1 to 512, plus a 2048^3 product. These operands stay in cache, so
  they are compute rates; the weights' trip from memory is counted apart, with
- streaming bandwidth: summing a 1 GiB fp32 tensor (read: the number the bounds use) and
  copying it (read + write).

Counted from the model's config.json (Llama layout: q/k/v/o projections, gated MLP), nothing
hard-coded: `params` (every weight once; tied embeddings once), `matmul_params` (every Linear's
weight, the LM head included even when tied) and, per token,
    flops(context) = 2 * matmul_params + 4 * layers * heads * head_dim * context
(a multiply-add per matmul weight, plus QK^T and AV over `context` earlier tokens). vLLM's CPU
build runs fp32 here, so a decode step reads `params * 4` bytes once for the whole batch, plus
each sequence's KV cache, 2 * layers * kv_heads * head_dim * 4 bytes a token.

Bounds in tokens/s (the most this machine allows, not a prediction):
- prefill of a `context`-token prompt: peak GEMM rate / (flops(context / 2) - 2 * LM head
  params) (a prompt token attends on average to half the prompt; logits are computed for the last
  position only); the weights are read once per chunk of many tokens.
- decode at batch B and context C: B / max(step bytes / bandwidth, B * flops(C) / rate(B)),
  step bytes = weight bytes + B * C * KV bytes a token, rate(B) the GEMM rate measured at that
  batch (interpolated in log B).
- LoRA training (cai's trainers freeze the base): forward 2 * matmul_params FLOPs a token plus
  the backward pass with respect to activations, another 2 * matmul_params; no weight gradients
  for the base and no gradient checkpointing on CPU (cai turns it on for CUDA only; it would add
  a forward). Attention costs 3x its forward (forward + backward wrt Q, K, V). The adapters' own
  matmuls (~4% at r=16) are left out, so the bound is slightly optimistic. DPO adds the
  reference forward (adapter disabled); a reward model has no LM head.

Why decode is bandwidth-bound at small batches and compute-bound at large ones: a step reads
every weight once whatever the batch and does 2 FLOPs per weight per sequence, so at fp32 the
weights give B/2 FLOPs a byte, against a machine balance (peak GEMM rate / bandwidth) of about
3 FLOPs a byte on the 2-core AVX-512 EPYC this was measured on (~215 GFLOP/s, ~80 GB/s). At
B = 1 a step is the weights' trip from memory, ~7 ms (at most ~150 tokens/s); once B/2 passes
the balance every extra sequence adds its own FLOPs, and tokens/s grows only as the GEMM rate
grows with B. Small matmuls run far below the peak here (~40 GFLOP/s at B = 1, ~70 at 8, ~200
from 256): a single row's matmuls take about as long as the weights' trip (B = 1 sits on the
edge and flips with noise), the matmuls bind from B = 2 on, and the bound flattens at 550-700
tokens/s.
Attention over the KV cache does 1.5 FLOPs a byte (9 query heads share 3 KV heads): below the
balance at any batch. Its bytes (45 KiB a token a step) grow with B * C, but at C = 1024 they
still take less time than the matmuls.
bf16: the bf16 table is what bf16 weights (half the bytes) and bf16 math would allow; on a CPU
with AVX512-BF16 the bf16 GEMM measured about 4x the fp32 rate from B = 32 up, on one with AVX2
only (also handed out as this machine, 2026-12-03) 1.2 GFLOP/s, 100x below fp32: cai stays fp32 on CPU.
The figures above are from the AVX512 host; the AVX2 host measured fp32 22 GFLOP/s at B = 1,
141 at 512, 33 GB/s: about 0.6x the bounds. Each result file records the machine it came from.

`generation_fraction` and `training_fraction` turn a stage's measured time into the share of
its bound it reached: (seconds the bound needs for the work) / (measured seconds), at most 1
while the bound holds; above 1 means a bound is too low (measured on a busy machine, say).
Other bench scripts: `from roofline import load_roofline, decode_bound, ...`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import time
from pathlib import Path

from results_io import machine, write_results

DEFAULT_PATH = "bench/results/roofline.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
GEMM_BATCHES = (1, 8, 32, 56, 72, 128, 256, 512)
SQUARE = 2048
TABLE_BATCHES = (1, 8, 32, 56, 72, 128)
TABLE_CONTEXTS = (256, 1024)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
RATES = {"float32": "gemm_fp32_flops", "bfloat16": "gemm_bf16_flops"}


# --- the model's costs, from its config ------------------------------------------------------

def model_costs(config: dict) -> dict:
    """Parameter counts and FLOPs per token of a Llama-layout decoder, from its config.json."""
    d, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", False))
    linear = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    bias = ((heads * head_dim + 2 * kv_heads * head_dim + d) * bool(config.get("attention_bias"))
            + (2 * inter + d) * bool(config.get("mlp_bias")))
    params = layers * (linear + bias + 2 * d) + d + vocab * d * (1 if tied else 2)  # 2 norms a layer, 1 final
    matmul_params = layers * linear + vocab * d
    return {
        "hidden_size": d, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": inter, "vocab_size": vocab, "tied_embeddings": tied,
        "params": params, "matmul_params": matmul_params, "lm_head_params": vocab * d,
        "kv_values_per_token": 2 * layers * kv_heads * head_dim,
        "weight_bytes_fp32": params * DTYPE_BYTES["float32"],
        "kv_bytes_per_token_fp32": 2 * layers * kv_heads * head_dim * DTYPE_BYTES["float32"],
        "flops_per_token": 2 * matmul_params,  # at context 0; attention adds the term below
        "attention_flops_per_context_token": 4 * layers * heads * head_dim,
    }


def read_model_config(name: str) -> dict:
    from cai import models

    return json.loads((Path(models.resolve(name)) / "config.json").read_text())


# --- measuring the machine --------------------------------------------------------------------

def best_seconds(fn, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Best per-call time over `repeats` timed runs, each of enough calls to last `min_seconds`."""
    fn()
    began = time.perf_counter()
    fn()
    calls = max(1, int(min_seconds / max(time.perf_counter() - began, 1e-9)))
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - began) / calls)
    return best


def gemm_flops(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    return 2 * m * k * n / best_seconds(lambda: torch.mm(a, b, out=out), repeats)


def measure_gemm(dtype, hidden: int, intermediate: int, slower_than: dict | None = None) -> dict:
    """FLOP/s per batch size and on one large square. With `slower_than` (the fp32 rates), a dtype
    that runs at under a quarter of it (bf16 on a CPU without native bf16) skips the square, which
    would take minutes at that rate, and reports the largest batch's rate for it."""
    rates = {str(b): gemm_flops(b, hidden, intermediate, dtype) for b in GEMM_BATCHES}
    largest = str(GEMM_BATCHES[-1])
    if slower_than is not None and rates[largest] < slower_than[largest] / 4:
        rates[f"square_{SQUARE}"] = rates[largest]
    else:
        rates[f"square_{SQUARE}"] = gemm_flops(SQUARE, SQUARE, SQUARE, dtype, repeats=3)
    return rates


def stream_rates(gib: float) -> tuple[float, float]:
    """(read, copy) bytes/s over one fresh fp32 tensor of `gib` GiB."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    read = nbytes / best_seconds(lambda: x.sum(), repeats=10, min_seconds=0)
    return read, 2 * nbytes / best_seconds(lambda: y.copy_(x), repeats=10, min_seconds=0)


def measure_bandwidth(gib: float = 1.0, allocations: int = 3) -> dict:
    """Best streaming rates over a few fresh tensors (one allocation's pages can be slower)."""
    rates = [stream_rates(gib) for _ in range(allocations)]
    return {"read_bytes_per_s": max(r for r, _ in rates), "copy_bytes_per_s": max(c for _, c in rates), "tensor_gib": gib}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure(model: str = DEFAULT_MODEL) -> dict:
    import torch

    began = time.perf_counter()
    costs = model_costs(read_model_config(model))
    fp32 = measure_gemm(torch.float32, costs["hidden_size"], costs["intermediate_size"])
    bf16 = measure_gemm(torch.bfloat16, costs["hidden_size"], costs["intermediate_size"], slower_than=fp32)
    bandwidth = measure_bandwidth()
    roof = {
        "model_name": model,
        "model": costs,
        "measured": {
            "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "gemm_shape": f"(B x {costs['hidden_size']}) @ ({costs['hidden_size']} x {costs['intermediate_size']})",
            "gemm_fp32_flops": fp32, "gemm_bf16_flops": bf16,
            **bandwidth,
            "seconds": round(time.perf_counter() - began, 1),
        },
    }
    roof["summary"] = summary(roof)
    roof["bounds"] = bounds_table(roof)
    return roof


def summary(roof: dict) -> dict:
    m = roof["measured"]
    return {
        "gemm_fp32_gflops": {k: round(v / 1e9, 1) for k, v in m["gemm_fp32_flops"].items()},
        "gemm_bf16_gflops": {k: round(v / 1e9, 1) for k, v in m["gemm_bf16_flops"].items()},
        "gemm_peak_fp32_gflops": round(peak_rate(roof) / 1e9, 1),
        "gemm_peak_bf16_gflops": round(peak_rate(roof, "bfloat16") / 1e9, 1),
        "read_gb_s": round(m["read_bytes_per_s"] / 1e9, 2),
        "copy_gb_s": round(m["copy_bytes_per_s"] / 1e9, 2),
        "machine_balance_flops_per_byte": round(peak_rate(roof) / m["read_bytes_per_s"], 1),
        "params_m": round(roof["model"]["params"] / 1e6, 2),
        "gflops_per_token": round(roof["model"]["flops_per_token"] / 1e9, 3),
    }


# --- the bounds -------------------------------------------------------------------------------

def flops_per_token(roof: dict, context: float) -> float:
    """Forward FLOPs for one token attending to `context` earlier tokens."""
    m = roof["model"]
    return m["flops_per_token"] + m["attention_flops_per_context_token"] * context


def peak_rate(roof: dict, dtype: str = "float32") -> float:
    """The best GEMM FLOP/s measured in this dtype (the compute roof for prefill and training)."""
    return max(roof["measured"][RATES[dtype]].values())


def gemm_rate(roof: dict, batch: float, dtype: str = "float32") -> float:
    """GEMM FLOP/s at this many rows of the model's shape, interpolated in log(batch)."""
    table = sorted((int(k), v) for k, v in roof["measured"][RATES[dtype]].items() if k.isdigit())
    sizes = [b for b, _ in table]
    if batch <= sizes[0]:
        return table[0][1]
    if batch >= sizes[-1]:
        return table[-1][1]
    i = bisect.bisect_right(sizes, batch)
    (b0, r0), (b1, r1) = table[i - 1], table[i]
    share = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return r0 + share * (r1 - r0)


def decode_step_seconds(roof: dict, batch: float, context: float, dtype: str = "float32") -> tuple[float, float]:
    """(seconds moving bytes, seconds computing) for one decode step of `batch` sequences."""
    m = roof["model"]
    step_bytes = (m["params"] + batch * context * m["kv_values_per_token"]) * DTYPE_BYTES[dtype]
    compute = batch * flops_per_token(roof, context) / gemm_rate(roof, batch, dtype)
    return step_bytes / roof["measured"]["read_bytes_per_s"], compute


def limited_by(roof: dict, batch: float, context: float, dtype: str = "float32") -> str:
    memory, compute = decode_step_seconds(roof, batch, context, dtype)
    return "bandwidth" if memory >= compute else "compute"


def decode_bound(roof: dict, batch: float, context: float, dtype: str = "float32") -> float:
    """Tokens/s over the batch, decoding `batch` sequences that are `context` tokens long."""
    return batch / max(decode_step_seconds(roof, batch, context, dtype))


def prefill_bound(roof: dict, context: float = 512, dtype: str = "float32", lm_head: bool = False) -> float:
    """Tokens/s prefilling `context`-token prompts at the peak GEMM rate. vLLM computes logits at
    each sequence's last position only (unless prompt log-probabilities are asked for, `lm_head`),
    so a prompt token costs the matmuls without the LM head: 21% of the builtin model's FLOPs.
    Counting the head made the labelling stage look 1.2x faster than its bound."""
    head = 0 if lm_head else 2 * roof["model"]["lm_head_params"]
    return peak_rate(roof, dtype) / (flops_per_token(roof, context / 2) - head)


def train_flops_per_token(roof: dict, seq_len: float = 0, reference_forward: bool = False, lm_head: bool = True) -> float:
    """LoRA training FLOPs a token (frozen base, see the module docstring); `seq_len` for attention."""
    m = roof["model"]
    matmul = m["matmul_params"] - (0 if lm_head else m["lm_head_params"])
    attention = m["attention_flops_per_context_token"] * seq_len / 2
    cost = 2 * (2 * matmul) + 3 * attention  # forward + backward wrt activations; attention fwd + bwd
    return cost + (2 * matmul + attention if reference_forward else 0)


def training_bound(roof: dict, dtype: str = "float32", **kwargs) -> float:
    return peak_rate(roof, dtype) / train_flops_per_token(roof, **kwargs)


def generation_bound_seconds(roof: dict, prompt_tokens_computed: float, completion_tokens: float, batch: float,
                             context: float, prefill_context: float | None = None) -> float:
    """Seconds the bounds need to prefill and decode this work."""
    prefill = prompt_tokens_computed / prefill_bound(roof, context if prefill_context is None else prefill_context)
    return prefill + (completion_tokens / decode_bound(roof, batch, context) if completion_tokens else 0.0)


def generation_fraction(roof: dict, prompt_tokens_computed: float, completion_tokens: float, seconds: float,
                        batch: float, context: float, prefill_context: float | None = None) -> float:
    """Bound time / measured time for generating work: `context` is the mean length of a sequence
    while it decodes, `prefill_context` the mean prompt length (defaults to `context`)."""
    return generation_bound_seconds(roof, prompt_tokens_computed, completion_tokens, batch, context, prefill_context) / seconds


def training_fraction(roof: dict, tokens: float, seconds: float, flops_per_token: float | None = None) -> float:
    """Bound time / measured time for LoRA training on `tokens` tokens (default cost: causal LM,
    attention left out; pass `train_flops_per_token(...)` for a stage's own)."""
    cost = train_flops_per_token(roof) if flops_per_token is None else flops_per_token
    return tokens * cost / peak_rate(roof) / seconds


def bounds_table(roof: dict) -> dict:
    table = {}
    for dtype in ("float32", "bfloat16"):  # bf16: what the same work would allow in bf16 weights and math
        table[dtype] = {
            "prefill_tokens_per_s": {str(c): round(prefill_bound(roof, c, dtype), 1) for c in TABLE_CONTEXTS},
            "decode_tokens_per_s": {str(c): {str(b): round(decode_bound(roof, b, c, dtype), 1) for b in TABLE_BATCHES}
                                    for c in TABLE_CONTEXTS},
            "decode_limited_by": {str(c): {str(b): limited_by(roof, b, c, dtype) for b in TABLE_BATCHES} for c in TABLE_CONTEXTS},
            "lora_training_tokens_per_s": {str(c): round(training_bound(roof, dtype, seq_len=c), 1) for c in TABLE_CONTEXTS},
            "dpo_training_tokens_per_s": {str(c): round(training_bound(roof, dtype, seq_len=c, reference_forward=True), 1)
                                          for c in TABLE_CONTEXTS},
        }
    return table


# --- loading ----------------------------------------------------------------------------------

def _same_machine(stored: dict) -> bool:
    import torch

    here = machine()
    return (stored.get("machine", {}).get("cpu_count") == here["cpu_count"]
            and stored.get("measured", {}).get("cpu") == cpu_name()
            and stored.get("measured", {}).get("threads") == torch.get_num_threads())


def load_roofline(path: str | Path = DEFAULT_PATH, measure_if_missing: bool = True, model: str = DEFAULT_MODEL) -> dict:
    """The stored roofline; measured (and stored) when missing or taken on another machine."""
    path = Path(path)
    if path.exists():
        roof = json.loads(path.read_text())
        if _same_machine(roof) and roof.get("model_name") == model:
            return roof
        why = "was measured on another machine or thread count" if roof.get("model_name") == model else f"is for {roof.get('model_name')}"
        if not measure_if_missing:
            raise RuntimeError(f"{path} {why}; run bench/roofline.py again")
        print(f"{path} {why}: measuring again", file=sys.stderr)
    elif not measure_if_missing:
        raise FileNotFoundError(f"{path}: run bench/roofline.py first")
    roof = measure(model)
    write_results(path, roof)
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default=DEFAULT_PATH)
    args = parser.parse_args()
    write_results(args.out, measure(args.model))


if __name__ == "__main__":
    main()
