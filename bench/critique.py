"""Critique-loop throughput: end-to-end loop vs the raw engine vs a sample-at-a-time loop.

    .venv/bin/python bench/critique.py [--engine vllm] [--prompts 32] [--rounds 1] [--max-tokens 64]

1. The loop: `CritiqueRun` over the prompts (stage-wise batches), tokens/s over its whole wall
   time (engine start-up excluded; prompt building, durable writes and filtering included).
2. The raw engine: the exact conversations the loop built, replayed stage by stage straight
   through `engine.generate` with the same seeds: the same token volume with no loop overhead.
   The ratio loop/raw is the loop's efficiency (target >= 0.9 with vLLM).
3. Sample-at-a-time: the same loop with chunk_size=1 on a quarter of the prompts, the shape of
   a naive implementation.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--constitution", default=str(shipped_dir("constitutions") / "harmless.yaml"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results/critique.json")
    args = parser.parse_args()

    constitution = load_constitution(args.constitution)
    prompts = load_prompts(str(ROOT / "cai" / "data" / "prompts" / "red_team.jsonl"), limit=args.prompts)
    settings = CritiqueSettings(rounds=args.rounds, drop_truncated=False,
                                sampling=SamplingSettings(temperature=0.7, max_tokens=args.max_tokens))
    started = time.perf_counter()
    engine = get_engine(args.model, EngineSettings(kind=args.engine))
    startup = time.perf_counter() - started
    # The first call pays one-off costs (allocations, lazy initialisation); keep them out of the loop's time.
    engine.generate([ChatPrompt.of(prompts[0].messages)], SamplingSettings(temperature=0.0, max_tokens=8))
    workdir = Path(tempfile.mkdtemp(prefix="cai-bench-"))
    try:
        run, summary, loop_seconds = timed_run(engine, constitution, prompts, settings, workdir / "loop")

        # Replay the loop's own requests through the bare engine, stage by stage.
        done = {stage: store.WorkLog(workdir / "loop" / "work" / f"{stage}.jsonl").read() for stage in stage_names(args.rounds)}
        raw_tokens, raw_seconds = 0, 0.0
        cold_prefix_cache(engine)
        for stage in stage_names(args.rounds):
            requests = [run.conversation(p, stage, done) for p in prompts]
            seeds = [request_seed(run.row_id(p), stage) for p in prompts]
            began = time.perf_counter()
            generations = engine.generate(requests, settings.sampling, seeds=seeds)
            raw_seconds += time.perf_counter() - began
            raw_tokens += sum(g.completion_tokens[0] for g in generations)

        subset = prompts[: max(1, len(prompts) // 4)]
        one_at_a_time = CritiqueSettings(**{**settings.__dict__, "chunk_size": 1})
        _, single_summary, single_seconds = timed_run(engine, constitution, subset, one_at_a_time, workdir / "single")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    loop_tps = summary.completion_tokens / loop_seconds
    raw_tps = raw_tokens / raw_seconds
    results = {
        "model": args.model,
        "engine": engine.name,
        "prompts": len(prompts),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "engine_startup_s": round(startup, 1),
        "loop": {"seconds": round(loop_seconds, 2), "new_tokens": summary.completion_tokens, "tokens_per_s": round(loop_tps, 1)},
        "raw_engine": {"seconds": round(raw_seconds, 2), "new_tokens": raw_tokens, "tokens_per_s": round(raw_tps, 1)},
        "loop_over_raw": round(loop_tps / raw_tps, 3),
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
