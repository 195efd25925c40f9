"""Ray engine throughput with 1 and 2 actors against the single-process engine, on this machine.

    .venv/bin/python bench/scale.py [--engine vllm] [--prompts 64] [--max-tokens 64] [--out bench/measured/scale.json]

The same seeded requests (SmolLM2-135M, the shipped red-team + benign prompts) go through:
1. the single-process engine (`--engine`, all of this machine's cores);
2. `engine.kind: ray` with one actor owning all cores;
3. `engine.kind: ray` with two actors of one core each, each owning its own engine.
Each is timed after one untimed warm-up call (engine start-up is reported apart), and the texts
are compared with the single-process engine's (greedy decoding: they must be identical).

How tokens/s grows (the model behind the numbers in bench/README.md): generation of a small
model at small batch is memory-bandwidth bound on a CPU and compute bound on a GPU at large
batch. Actors are independent engines, so on N GPUs with data-parallel actors

    tokens/s(N) ~= N * tokens/s(1 actor) * efficiency,

where efficiency < 1 comes from load imbalance at the end of each call (the driver hands out one
shard per actor per chunk; a chunk finishes with its slowest shard) and from the driver's
serialisation of requests and results (small next to decoding). On this 2-core CPU two actors
share one memory bus and two cores, so two actors cannot beat one actor holding both cores:
the bench measures the overhead of the Ray layer here, not the scaling. For reference, llm-swarm's
Constitutional AI run reached about 2,472 tokens/s on 64 GPUs (~39 tokens/s per GPU, with TGI,
writing nothing until the end); one vLLM actor per GPU with a 7B model decodes at several
hundred to a few thousand tokens/s at batch 64+, so cai's Ray engine on 64 GPUs should be bounded
by the fleet's decode rate rather than by the driver, while appending each finished chunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from results_io import write_results

from cai.durable import request_seed
from cai.engines import ChatPrompt, EngineSettings, RaySettings, SamplingSettings, close_all, get_engine
from cai.prompt_sets import load_prompts

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def requests(count: int) -> list[ChatPrompt]:
    prompts = []
    for name in ("red_team.jsonl", "benign.jsonl"):
        prompts += load_prompts(str(ROOT / "cai" / "data" / "prompts" / name))
    return [ChatPrompt.of(p.messages) for p in prompts[:count]]


def measure(label: str, settings: EngineSettings, prompts: list[ChatPrompt], sampling: SamplingSettings) -> dict:
    began = time.perf_counter()
    engine = get_engine(MODEL, settings)
    started = time.perf_counter() - began
    seeds = [request_seed(str(i), 0) for i in range(len(prompts))]
    engine.generate(prompts[:4], sampling, seeds=seeds[:4])  # warm-up: first-batch costs
    began = time.perf_counter()
    out = engine.generate(prompts, sampling, seeds=seeds)
    seconds = time.perf_counter() - began
    tokens = sum(sum(g.completion_tokens) for g in out)
    close_all()
    if settings.kind == "ray":
        import ray

        ray.shutdown()
    result = {"start_s": round(started, 1), "seconds": round(seconds, 2), "completion_tokens": tokens,
              "tokens_per_s": round(tokens / seconds, 1), "texts": [g.texts for g in out]}
    print(f"{label}: {result['tokens_per_s']} tok/s ({tokens} tokens in {seconds:.1f} s; start {started:.1f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "measured" / "scale.json"))
    args = parser.parse_args()
    prompts = requests(args.prompts)
    sampling = SamplingSettings(temperature=0.0, max_tokens=args.max_tokens)
    runs = {
        "single_process": measure("single process", EngineSettings(kind=args.engine, threads=args.cores), prompts, sampling),
        "ray_1_actor": measure("ray, 1 actor", EngineSettings(kind="ray", ray=RaySettings(
            engine=args.engine, actors=1, cpus_per_actor=args.cores, num_cpus=args.cores)), prompts, sampling),
        "ray_2_actors": measure("ray, 2 actors", EngineSettings(kind="ray", ray=RaySettings(
            engine=args.engine, actors=2, cpus_per_actor=args.cores / 2, num_cpus=args.cores)), prompts, sampling),
    }
    reference = runs["single_process"]["texts"]
    for run in runs.values():
        run["identical_to_single_process"] = run.pop("texts") == reference
    single = runs["single_process"]["tokens_per_s"]
    results = {"engine": args.engine, "model": MODEL, "prompts": len(prompts), "max_tokens": args.max_tokens,
               "cores": args.cores, "runs": runs,
               "ray_over_single": {k: round(v["tokens_per_s"] / single, 3) for k, v in runs.items()},
               "reference_llm_swarm": {"tokens_per_s": 2472, "gpus": 64, "per_gpu": round(2472 / 64, 1)}}
    write_results(args.out, results)


if __name__ == "__main__":
    main()
