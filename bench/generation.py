"""Generation throughput: vLLM vs transformers batched vs transformers one-at-a-time.

    .venv/bin/python bench/generation.py [--prompts 64] [--max-tokens 64] [--out bench/results/generation.json]

Same chat prompts and token budget through each engine, greedy; tokens/s counts generated
tokens only. One-at-a-time runs a quarter of the prompts (it is ~10x slower; tokens/s is a rate,
so the comparison holds). vLLM start-up is reported separately, not counted in its rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from results_io import write_results

from cai.engines.base import ChatPrompt, SamplingSettings

DATA = Path(__file__).resolve().parent.parent / "cai" / "data" / "prompts"
FALLBACK = ["Explain how a bicycle gear works.", "Write a haiku about rain.", "How do I boil an egg?"]


def load_prompts(count: int) -> list[ChatPrompt]:
    texts = []
    for name in ("red_team.jsonl", "benign.jsonl"):
        path = DATA / name
        if path.exists():
            texts += [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    texts = texts or FALLBACK
    texts = [texts[i % len(texts)] for i in range(count)]
    return [ChatPrompt.of([{"role": "user", "content": t}]) for t in texts]


def measure(engine, prompts, sampling) -> dict:
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(sum(g.completion_tokens) for g in out)
    return {"prompts": len(prompts), "new_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--out", default="bench/results/generation.json")
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)
    sampling = SamplingSettings(temperature=0, max_tokens=args.max_tokens)
    results: dict = {"model": args.model, "max_tokens": args.max_tokens, "engines": {}}

    from cai.engines.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(args.model, max_model_len=2048)
    results["vllm_startup_s"] = round(time.perf_counter() - start, 1)
    engine.generate(prompts[:2], sampling)  # warm-up
    results["engines"]["vllm"] = measure(engine, prompts, sampling)
    engine.close()

    from cai.engines.hf import HFEngine

    batched = HFEngine(args.model, batch_size=args.hf_batch_size)
    results["engines"][f"hf_batch{args.hf_batch_size}"] = measure(batched, prompts, sampling)
    single = HFEngine(args.model, batch_size=1)
    results["engines"]["hf_one_at_a_time"] = measure(single, prompts[: max(1, len(prompts) // 4)], sampling)

    write_results(args.out, results)


if __name__ == "__main__":
    main()
