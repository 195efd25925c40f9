"""The Ray engine (cai/engines/ray_engine.py) on a local Ray cluster of this CPU: two actors,
each owning a transformers engine on the tiny model, against the single-process hf engine.

Kills are deterministic (cai/testing_hooks.py): the actor serving shard 0 kills itself on its
first call (`ray.actor.shard0`), once across processes (`CAI_TEST_KILL_ONCE`), and the test checks
the marker, so it cannot pass without a kill.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from cai.engines import EngineSettings, RaySettings  # noqa: E402
from cai.engines.base import ChatPrompt, SamplingSettings  # noqa: E402
from cai.engines.hf import HFEngine  # noqa: E402
from cai.engines.ray_engine import RayEngine  # noqa: E402
from cai.errors import CaiError  # noqa: E402

PROMPTS = [ChatPrompt.of([{"role": "user", "content": f"Tell me about {i} " + "and more " * (i % 5)}]) for i in range(12)]
SEEDS = list(range(500, 512))
SAMPLED = SamplingSettings(n=2, temperature=1.0, max_tokens=10)
GREEDY = SamplingSettings(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_causal_lm_dir):
    engine = HFEngine(str(tiny_causal_lm_dir), batch_size=4, threads=1)
    return (engine.generate(PROMPTS, SAMPLED, seeds=SEEDS), engine.generate(PROMPTS, GREEDY),
            engine.score_choices(PROMPTS, ["A", "B"]))


def ray_engine(model, **ray_settings):
    return RayEngine(str(model), EngineSettings(kind="ray", batch_size=4, ray=RaySettings(engine="hf", **ray_settings)))


def same(generations, expected):
    return [g.texts for g in generations] == [g.texts for g in expected] and \
        [g.completion_tokens for g in generations] == [g.completion_tokens for g in expected]


def saved_adapter(model, where):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(where)
    return str(where)


def test_two_actors_give_the_hf_engines_rows_survive_a_killed_actor_and_take_adapters(
        local_cluster, tiny_causal_lm_dir, reference, tmp_path, monkeypatch):
    """About a minute on this CPU: the default run's check of the Ray engine."""
    sampled, greedy, scores = reference
    adapter = saved_adapter(tiny_causal_lm_dir, tmp_path / "adapter")
    local = HFEngine(str(tiny_causal_lm_dir), batch_size=4, threads=1, adapters={"policy": adapter})
    tuned = local.generate(PROMPTS, GREEDY, adapter="policy")
    assert not same(tuned, greedy)  # the adapter changes the answers, so the comparison below means something
    marker = tmp_path / "killed"
    monkeypatch.setenv("CAI_TEST_KILL_AT", "ray.actor.shard0:1")
    monkeypatch.setenv("CAI_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("CAI_TEST_KILL_ONCE", "1")
    engine = ray_engine(tiny_causal_lm_dir, actors=2, max_restarts=1)
    try:
        pids = set(engine.pids)
        out = engine.generate(PROMPTS, SAMPLED, seeds=SEEDS)
        assert marker.exists(), "no actor was killed"
        assert len(out) == 12 and same(out, sampled)  # the killed shard was re-run once, nothing lost or doubled
        restarted = set(engine.served_by) - pids
        assert len(restarted) == 1  # Ray restarted the dead actor (a new process) and re-ran its call
        assert same(engine.generate(PROMPTS, GREEDY), greedy)
        got = engine.score_choices(PROMPTS, ["A", "B"])
        flat = [p for row in got.probs for p in row]
        assert flat == pytest.approx([p for row in scores.probs for p in row], abs=1e-5)  # other batch padding: float32 noise
        assert got.prompt_tokens == scores.prompt_tokens and len(got.probs) == 12
        assert len(set(engine.served_by)) == 2  # both actors served shards
        with pytest.raises(CaiError, match="share a first token"):  # an engine's refusal: the same one line
            engine.score_choices(PROMPTS, ["A", "A"])
        assert same(engine.generate(PROMPTS, GREEDY), greedy)  # nothing of the refused call is left behind
        # A LoRA adapter added on the driver is rebuilt inside each actor from Ray's object store.
        engine.add_adapter("policy", adapter)
        assert same(engine.generate(PROMPTS, GREEDY, adapter="policy"), tuned)
        assert same(engine.generate(PROMPTS, GREEDY), greedy)
        with pytest.raises(CaiError, match="unknown adapter 'other'"):
            engine.generate(PROMPTS, GREEDY, adapter="other")
    finally:
        engine.close()


@pytest.mark.slow
def test_an_actor_that_stays_dead_hands_its_rows_to_the_others(
        local_cluster, tiny_causal_lm_dir, reference, tmp_path, monkeypatch):
    sampled = reference[0]
    marker = tmp_path / "killed"
    monkeypatch.setenv("CAI_TEST_KILL_AT", "ray.actor.shard0:1")
    monkeypatch.setenv("CAI_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("CAI_TEST_KILL_ONCE", "1")
    engine = ray_engine(tiny_causal_lm_dir, actors=2, max_restarts=0, shard_rows=3)
    try:
        out = engine.generate(PROMPTS, SAMPLED, seeds=SEEDS)
        assert marker.exists() and len(engine.living) == 1
        assert same(out, sampled)  # 4 shards of 3 rows, one lost with its actor and re-run on the other
        assert set(engine.served_by) == {engine.pids[1]} or set(engine.served_by) == {engine.pids[0]}
        assert same(engine.generate(PROMPTS, SAMPLED, seeds=SEEDS), sampled)  # later calls: the survivor alone
    finally:
        engine.close()


SAMPLE_SCRIPT = """
import os
import subprocess
import sys
from pathlib import Path
from cai.engines import EngineSettings, RaySettings
from cai.engines.base import SamplingSettings
from cai.engines.ray_engine import RayEngine
from cai.prompt_sets import Prompt
from cai.sampling import SampleSettings, run_sampling
kind, model, out = sys.argv[1:4]
prompts = [Prompt(id=f"q{i}", messages=({"role": "user", "content": f"question {i} " * (1 + i % 4)},)) for i in range(16)]
settings = SampleSettings(k=2, chunk_size=4, sampling=SamplingSettings(temperature=1.0, max_tokens=16))
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
engine = RayEngine(model, EngineSettings(kind="ray", batch_size=2, ray=RaySettings(engine="hf", actors=2)))
run_sampling(engine, prompts, out, settings, show_progress=False)
"""


@pytest.mark.slow
def test_a_killed_driver_resumes_with_only_the_missing_rows(tiny_causal_lm_dir, tmp_path):
    """The sample stage on the cluster, its driver SIGKILLed after 2 of 4 chunks, then rerun: the
    file equals an uninterrupted cluster run's byte for byte, no row doubled. (Row seeds come from
    row ids, which name the engine, so the stage's rows are compared engine to engine; the Ray
    engine's equality with the hf engine per request is the test above.)"""
    from test_crash_safety import lines, run_killed_at, run_ok

    from cai.store import read_jsonl

    run_ok([sys.executable, "-c", SAMPLE_SCRIPT, "ray", str(tiny_causal_lm_dir), str(tmp_path / "reference")])
    args = [sys.executable, "-c", SAMPLE_SCRIPT, "ray", str(tiny_causal_lm_dir), str(tmp_path / "killed")]
    run_killed_at(args, "worklog.append", 2, tmp_path)
    work = tmp_path / "killed" / "work" / "samples.jsonl"
    assert lines(work) == 8
    run_ok(args)
    assert (tmp_path / "killed" / "responses.jsonl").read_text() == (tmp_path / "reference" / "responses.jsonl").read_text()
    ids = [row["id"] for row in read_jsonl(work)]
    assert len(ids) == len(set(ids)) == 16


def test_bad_ray_settings_stop_with_the_field():
    with pytest.raises(CaiError, match="engine.ray.actors"):
        RaySettings(actors=0)
    with pytest.raises(CaiError, match="engine.ray.engine"):
        RaySettings(engine="openai")
    with pytest.raises(CaiError, match="set engine.ray.gpus_per_actor to 2"):
        EngineSettings(kind="ray", tensor_parallel_size=2, ray=RaySettings(gpus_per_actor=1))


def test_tensor_parallelism_is_refused_without_cuda(tiny_causal_lm_dir):
    from cai.engines.vllm_engine import VLLMEngine

    with pytest.raises(CaiError, match="tensor parallelism needs CUDA"):
        VLLMEngine(str(tiny_causal_lm_dir), tensor_parallel_size=2)


@pytest.mark.slow
def test_a_whole_recipe_runs_on_the_cluster(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """Every stage through `cai run` with `engine.kind: ray`: sampling from the SFT adapter and the
    eval of the trained policy go through adapters rebuilt inside the actors."""
    import json

    from test_recipes import MINI, RECIPES, write

    from cai.engines import close_all
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    monkeypatch.chdir(RECIPES.parent)
    path = write(tmp_path / "mini.yaml", MINI.format(model=tiny_causal_lm_dir, out=tmp_path / "run"))
    recipe = load_recipe(path, ["engine.kind=ray", "engine.ray.engine=hf", "engine.ray.num_cpus=2", "adapter_engine=same"])
    try:
        timings = RecipeRunner(recipe, log=lambda line: None).run()
    finally:
        close_all()
        ray.shutdown()
    assert list(timings) == ["critique", "sft", "sample", "label", "blend", "rm", "dpo", "eval"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "sample" / "responses.jsonl").read_text().splitlines()]
    assert rows and {r["provenance"]["engine"] for r in rows} == {"ray"} and all(r["provenance"]["adapter"] for r in rows)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["policy_stage"] == "dpo" and metrics["win_rate_labeller"]["all"]["n"] == 6


@pytest.mark.slow
def test_the_engine_joins_a_cluster_started_with_ray_start(tiny_causal_lm_dir, tmp_path):
    """`ray start --head`, then `engine.ray.address` pointing at it: what recipes/scale-out.yaml does."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)} if len(str(tmp_path)) < 60 else dict(os.environ)
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                   check=True, capture_output=True, timeout=180, env=env)
    try:
        engine = RayEngine(str(tiny_causal_lm_dir), EngineSettings(kind="ray", batch_size=4, ray=RaySettings(
            engine="hf", actors=2, address=f"127.0.0.1:{port}")))
        try:
            assert len(set(engine.pids)) == 2
            out = engine.generate(PROMPTS, SAMPLED, seeds=SEEDS)
            expected = HFEngine(str(tiny_causal_lm_dir), batch_size=4, threads=1).generate(PROMPTS, SAMPLED, seeds=SEEDS)
            assert same(out, expected)
        finally:
            engine.close()
            ray.shutdown()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
