"""Sampling from a trained LoRA adapter: merged weights on vLLM vs vLLM's LoRA path vs transformers.

    .venv/bin/python bench/adapters.py [--adapter runs/quickstart/sft/adapter] [--out bench/results/adapters.json]

The quickstart's sample stage (36 prompts, 2 samples each, temperature 1, 80 tokens) and eval
answers (32 prompts, greedy, 80 tokens), timed on:
1. vLLM serving the adapter merged into a copy of the weights (`merge_adapters`, cai's CPU
   default): base model and adapter, plus the one-off merge and the in-place weight swap;
2. vLLM with LoRA slots (`enable_lora`), adapter per request (cai's default on a GPU);
3. the transformers engine with the adapter attached (cai's CPU default before merging).
Engine start-ups are reported apart and never counted in a rate. The target (issue 22): the
adapter within 10% of the base model's tokens/s.

Numerics: merging adds the LoRA delta into the weights once, so results may differ from the
unmerged adapter by rounding. Reported on the same inputs: the share of identical greedy answers
(merged vs vLLM LoRA, merged vs transformers LoRA) and the largest per-token difference of the
log-probabilities of the same token ids (merged vs vLLM LoRA).
Each rate also states its fraction of this machine's decode bound (bench/roofline.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from results_io import write_results

from cai import chat, merge, models
from cai.durable import request_seed
from cai.engines.base import ChatPrompt, SamplingSettings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "cai" / "data" / "prompts"


def prompts(name: str, limit: int) -> list[ChatPrompt]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()][:limit]
    return [ChatPrompt.of([{"role": "user", "content": row["prompt"]}]) for row in rows]


def timed(engine, requests, sampling, adapter, seeds=None) -> tuple[dict, list]:
    start = time.perf_counter()
    out = engine.generate(requests, sampling, adapter=adapter, seeds=seeds)
    seconds = time.perf_counter() - start
    tokens = sum(sum(g.completion_tokens) for g in out)
    return {"new_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}, out


def workload(engine, adapter, sample_requests, eval_requests) -> tuple[dict, list[str]]:
    sample = SamplingSettings(n=2, temperature=1.0, max_tokens=80)
    greedy = SamplingSettings(temperature=0.0, max_tokens=80)
    seeds = [request_seed("bench", i) for i in range(len(sample_requests))]
    engine.generate(sample_requests[:2], greedy, adapter=adapter)  # warm-up (and the swap, for merged weights)
    sampled, _ = timed(engine, sample_requests, sample, adapter, seeds)
    answered, out = timed(engine, eval_requests, greedy, adapter)
    return {"sample": sampled, "eval_greedy": answered}, [g.texts[0] for g in out]


def started(make):
    start = time.perf_counter()
    engine = make()
    return engine, round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default="runs/quickstart/sft/adapter")
    parser.add_argument("--out", default="bench/results/adapters.json")
    parser.add_argument("--skip-vllm-lora", action="store_true",
                        help="leave out vLLM's LoRA slots (minutes on an AVX2 CPU; its numerics keys are then absent)")
    args = parser.parse_args()
    adapter = str(Path(args.adapter).resolve())
    sample_requests = prompts("red_team.jsonl", 24) + prompts("benign.jsonl", 12)
    eval_requests = prompts("eval_red_team.jsonl", 16) + prompts("eval_benign.jsonl", 16)
    results: dict = {"model": args.model, "adapter": args.adapter, "engines": {}}

    with tempfile.TemporaryDirectory() as tmp:  # the merge itself, uncached
        start = time.perf_counter()
        merge._merge(models.resolve(args.model), Path(adapter), Path(tmp) / "m", False)
        results["merge_seconds"] = round(time.perf_counter() - start, 1)

    from cai.engines.vllm_engine import VLLMEngine

    engine, results["vllm_start_seconds"] = started(lambda: VLLMEngine(args.model, max_model_len=2048, merge_adapters=True,
                                                                        adapters={"policy": adapter}))
    base, base_texts = workload(engine, None, sample_requests, eval_requests)
    merged, merged_texts = workload(engine, "policy", sample_requests, eval_requests)
    swaps = []
    for target in (None, "policy", None, "policy"):
        start = time.perf_counter()
        engine._use_weights(target)
        swaps.append(time.perf_counter() - start)
    results["swap_seconds"] = round(sum(swaps) / len(swaps), 2)
    ids = [engine.tokenizer(chat.render(engine.tokenizer, r.messages), add_special_tokens=False)["input_ids"] for r in eval_requests]
    responses = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] or [engine.tokenizer.eos_token_id] for t in merged_texts]
    merged_lp = engine.sequence_logprobs(ids, responses, adapter="policy")
    engine.close()
    del engine
    gc.collect()
    results["engines"]["vllm_base"] = base
    results["engines"]["vllm_merged"] = merged

    lora_texts = lora_lp = None
    if not args.skip_vllm_lora:
        engine, results["vllm_lora_start_seconds"] = started(lambda: VLLMEngine(args.model, max_model_len=2048, enable_lora=True,
                                                                                 adapters={"policy": adapter}))
        lora, lora_texts = workload(engine, "policy", sample_requests, eval_requests)
        lora_lp = engine.sequence_logprobs(ids, responses, adapter="policy")
        engine.close()
        del engine
        gc.collect()
        results["engines"]["vllm_lora"] = lora

    from cai.engines.hf import HFEngine

    engine, results["hf_start_seconds"] = started(lambda: HFEngine(args.model, batch_size=16, adapters={"policy": adapter}))
    hf, hf_texts = workload(engine, "policy", sample_requests, eval_requests)
    results["engines"]["hf_lora"] = hf

    base_rate = base["sample"]["tokens_per_s"]
    results["adapter_vs_base"] = {name: round(r["sample"]["tokens_per_s"] / base_rate, 3)
                                  for name, r in results["engines"].items() if name != "vllm_base"}
    tokens = sum(len(r) for r in responses)
    results["numerics"] = {
        "greedy_identical_merged_vs_hf_lora": round(sum(a == b for a, b in zip(merged_texts, hf_texts)) / len(ids), 3),
        "greedy_differs_from_base": round(sum(a != b for a, b in zip(merged_texts, base_texts)) / len(ids), 3),
        "scored_tokens": tokens,
    }
    if lora_texts is not None:
        results["numerics"].update({
            "greedy_identical_merged_vs_vllm_lora": round(sum(a == b for a, b in zip(merged_texts, lora_texts)) / len(ids), 3),
            "greedy_identical_vllm_lora_vs_hf_lora": round(sum(a == b for a, b in zip(lora_texts, hf_texts)) / len(ids), 3),
            "max_abs_sequence_logprob_diff": round(max(abs(a - b) for a, b in zip(merged_lp, lora_lp)), 5),
            "mean_abs_per_token_logprob_diff": round(sum(abs(a - b) for a, b in zip(merged_lp, lora_lp)) / tokens, 7),
        })
    try:
        from roofline import generation_fraction, load_roofline

        roof = load_roofline()
        for name, r in results["engines"].items():
            for part, batch in (("sample", 2 * len(sample_requests)), ("eval_greedy", len(eval_requests))):
                r[part]["roofline_fraction"] = round(generation_fraction(
                    roof, prompt_tokens_computed=0, completion_tokens=r[part]["new_tokens"], seconds=r[part]["seconds"],
                    batch=batch, context=256), 3)
    except ImportError:
        pass
    write_results(args.out, results)


if __name__ == "__main__":
    main()
