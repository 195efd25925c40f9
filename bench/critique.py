"""Critique-loop throughput: end-to-end loop vs the raw engine vs a sample-at-a-time loop.

    .venv/bin/python bench/critique.py [--engine vllm] [--prompts 32] [--rounds 1] [--max-tokens 64] [--repeats 3]

1. The loop: `CritiqueRun` over the prompts (stage-wise batches), tokens/s over its whole wall
   time (engine start-up excluded; prompt building, durable writes and filtering included).
2. The raw engine: the exact conversations the loop built, replayed stage by stage straight
   through `engine.generate` with the same seeds: the same token volume with no loop overhead.
   The ratio loop/raw is the loop's efficiency (target >= 0.95 with vLLM).
3. Sample-at-a-time: the same loop with chunk_size=1 on a quarter of the prompts, the shape of
   a naive implementation.

How the comparison is kept fair: every timed part starts from a cold prefix cache; one untimed
loop run first pays the engine's one-off costs (the first large batch) and supplies the
conversations to replay; then loop and raw are timed `--repeats` times, taking turns at going
first, and `loop_over_raw` is the median of the per-repeat ratios. On a shared CPU the engine's
own speed wanders by more than the loop costs, so `loop.overhead_s` also reports what the loop
spends outside `engine.generate` (its wall time minus the engine calls it timed): the loop's cost
measured directly, free of that noise. Each stage's prefix-cache share (prompt tokens the engine
served from its cache) comes from the loop's summary.
Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from results_io import write_results

from cai.constitution import load_constitution
from cai.critique import CritiqueRun, CritiqueSettings, stage_names
from cai.durable import request_seed
from cai.engines import ChatPrompt, EngineSettings, SamplingSettings, get_engine
from cai.paths import shipped_dir
from cai.prompt_sets import load_prompts
from cai.prompts import PromptSet
from cai import store

ROOT = Path(__file__).resolve().parent.parent


def cold_prefix_cache(engine) -> None:
    """Each measured part starts with an empty prefix cache: the raw replay sends exactly the
    loop's conversations, and a cache still warm from the loop would make its prefill free."""
    if hasattr(engine, "llm"):
        engine.llm.reset_prefix_cache()


def timed_run(engine, constitution, prompts, settings, out):
    cold_prefix_cache(engine)
    start = time.perf_counter()
    run = CritiqueRun(engine, constitution, prompts, PromptSet(), out, settings, overwrite=True, show_progress=False)
    summary = run.run()
    return run, summary, time.perf_counter() - start


def replay(engine, run, prompts, stages, done, sampling) -> tuple[int, float]:
    """The loop's own requests through the bare engine, stage by stage: (new tokens, seconds in generate)."""
    cold_prefix_cache(engine)
    tokens, seconds = 0, 0.0
    for stage in stages:
        requests = [run.conversation(p, stage, done) for p in prompts]
        seeds = [request_seed(run.row_id(p), stage) for p in prompts]
        began = time.perf_counter()
        generations = engine.generate(requests, sampling, seeds=seeds)
        seconds += time.perf_counter() - began
        tokens += sum(g.completion_tokens[0] for g in generations)
    return tokens, seconds


def texts(out: Path, stages) -> dict:
    return {stage: {k: v["text"] for k, v in store.WorkLog(out / "work" / f"{stage}.jsonl").read().items()} for stage in stages}


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--constitution", default=str(shipped_dir("constitutions") / "harmless.yaml"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed loop/raw pairs, taking turns at going first")
    parser.add_argument("--out", default="bench/results/critique.json")
    args = parser.parse_args()

    constitution = load_constitution(args.constitution)
    prompts = load_prompts(str(ROOT / "cai" / "data" / "prompts" / "red_team.jsonl"), limit=args.prompts)
    settings = CritiqueSettings(rounds=args.rounds, drop_truncated=False,
                                sampling=SamplingSettings(temperature=0.7, max_tokens=args.max_tokens))
    stages = stage_names(args.rounds)
    started = time.perf_counter()
    engine = get_engine(args.model, EngineSettings(kind=args.engine))
    startup = time.perf_counter() - started
    engine.generate([ChatPrompt.of(prompts[0].messages)], SamplingSettings(temperature=0.0, max_tokens=8))
    workdir = Path(tempfile.mkdtemp(prefix="cai-bench-"))
    try:
        # Untimed: the engine's first large batches (allocations, lazy initialisation) and the conversations to replay.
        run, warm_summary, warm_seconds = timed_run(engine, constitution, prompts, settings, workdir / "warm-up")
        done = {stage: store.WorkLog(workdir / "warm-up" / "work" / f"{stage}.jsonl").read() for stage in stages}
        reference = texts(workdir / "warm-up", stages)
        repeats, identical = [], True
        for index in range(args.repeats):
            measured = {}
            for part in (("loop", "raw") if index % 2 == 0 else ("raw", "loop")):
                if part == "loop":
                    out = workdir / f"loop-{index}"
                    _, summary, seconds = timed_run(engine, constitution, prompts, settings, out)
                    identical &= texts(out, stages) == reference
                    engine_seconds = sum(s["seconds"] for s in summary.stages.values())
                    measured["loop"] = {"seconds": seconds, "tokens": summary.completion_tokens,
                                        "overhead_s": seconds - engine_seconds, "summary": summary}
                else:
                    tokens, seconds = replay(engine, run, prompts, stages, done, settings.sampling)
                    measured["raw"] = {"seconds": seconds, "tokens": tokens}
            loop, raw = measured["loop"], measured["raw"]
            measured["ratio"] = (loop["tokens"] / loop["seconds"]) / (raw["tokens"] / raw["seconds"])
            repeats.append(measured)

        subset = prompts[: max(1, len(prompts) // 4)]
        one_at_a_time = CritiqueSettings(**{**settings.__dict__, "chunk_size": 1})
        _, single_summary, single_seconds = timed_run(engine, constitution, subset, one_at_a_time, workdir / "single")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    loop_seconds = median([r["loop"]["seconds"] for r in repeats])
    raw_seconds = median([r["raw"]["seconds"] for r in repeats])
    summary = repeats[0]["loop"]["summary"]
    results = {
        "model": args.model,
        "engine": engine.name,
        "prompts": len(prompts),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "engine_startup_s": round(startup, 1),
        "warm_up_loop_s": round(warm_seconds, 2),
        "loop": {
            "seconds": round(loop_seconds, 2),
            "new_tokens": summary.completion_tokens,
            "tokens_per_s": round(summary.completion_tokens / loop_seconds, 1),
            "overhead_s": round(median([r["loop"]["overhead_s"] for r in repeats]), 3),
            "outputs_identical_across_runs": identical,
        },
        "raw_engine": {
            "seconds": round(raw_seconds, 2),
            "new_tokens": repeats[0]["raw"]["tokens"],
            "tokens_per_s": round(repeats[0]["raw"]["tokens"] / raw_seconds, 1),
        },
        "loop_over_raw": round(median([r["ratio"] for r in repeats]), 3),
        "loop_over_raw_each": [round(r["ratio"], 3) for r in repeats],
        "loop_overhead_share": round(median([r["loop"]["overhead_s"] / r["loop"]["seconds"] for r in repeats]), 4),
        "prefix_cache": {
            stage: {key: stats[key] for key in ("prompt_tokens", "cached_prompt_tokens", "cached_prompt_share")}
            for stage, stats in summary.stages.items()
        } | {"total": {"prompt_tokens": summary.prompt_tokens, "cached_prompt_tokens": summary.cached_prompt_tokens,
                       "cached_prompt_share": summary.cached_prompt_share}},
        "sample_at_a_time": {
            "prompts": len(subset),
            "seconds": round(single_seconds, 2),
            "new_tokens": single_summary.completion_tokens,
            "tokens_per_s": round(single_summary.completion_tokens / single_seconds, 1),
        },
    }
    write_results(args.out, results)


if __name__ == "__main__":
    main()
