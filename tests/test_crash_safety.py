"""SIGKILL at known points, rerun, compare with an uninterrupted run.

Every kill lands at a named, deterministic point, never after a sleep: the child runs with
CAI_TEST_KILL_AT=worklog.append:<n> (see cai/testing_hooks.py) and kills itself right after its
n-th work-log append is on disk, or a test script kills it inside a checkpoint save. Each test
checks the child really died by SIGKILL, at that point (the marker file, the rows on disk), so it
cannot pass without a kill, and passes or fails the same way on a fast or a loaded machine.

Data stages (sample, label, blend) must end with byte-identical files, no row lost or doubled.
Training stages (reward model, SFT, DPO) must resume from their last *whole* checkpoint (a kill
in the middle of writing one falls back to the one before), run only the remaining steps, and end
with the same adapter weights as a run that was never killed. The critique stage has its own kill
tests in test_critique.py, PPO its resume test in test_ppo.py.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai.store import latest_checkpoint, read_jsonl

CHILD_TIMEOUT = 240  # seconds for one child run; a hang fails the test, not the whole session


def run_killed_at(args, point: str, n: int, marker_dir: Path) -> None:
    """Run `args` with CAI_TEST_KILL_AT=<point>:<n>; check it died by SIGKILL at exactly that point."""
    marker = marker_dir / f"killed-at-{point}-{n}"
    env = {**os.environ, "CAI_TEST_KILL_AT": f"{point}:{n}", "CAI_TEST_KILL_MARKER": str(marker)}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert marker.read_text().startswith(f"{point}:{n} "), "killed, but not at the requested point"


def tear_last_line(path: Path) -> None:
    """Append the first half of a copy of the log's last row, unterminated: what a kill in the
    middle of a write leaves (the hook kills between whole appends)."""
    last = path.read_bytes().splitlines()[-1]
    with path.open("ab") as handle:
        handle.write(last[: len(last) // 2])


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def run_ok(args):
    result = subprocess.run(args, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


SAMPLE_SCRIPT = """
import sys
from cai.engines.base import SamplingSettings
from cai.engines.hf import HFEngine
from cai.prompt_sets import Prompt
from cai.sampling import SampleSettings, run_sampling
model, out = sys.argv[1:3]
prompts = [Prompt(id=f"q{i}", messages=({"role": "user", "content": f"question {i} " * (1 + i % 4)},)) for i in range(16)]
settings = SampleSettings(k=3, chunk_size=2, sampling=SamplingSettings(temperature=1.0, max_tokens=24))
run_sampling(HFEngine(model, batch_size=2), prompts, out, settings, show_progress=False)
"""


# 16 prompts in chunks of 2: 8 appends. Kill after the first, a middle and the last-but-one;
# once with a torn half line after the kill.
# The default run keeps the middle kill (with a torn line); the first and last-but-one are `slow`
# (each ~20 s: the same code path at other points).
KILL_POINTS = [pytest.param(1, False, marks=pytest.mark.slow), (4, True), pytest.param(7, False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("appends,torn", KILL_POINTS)
def test_sample_stage_survives_sigkill(tiny_causal_lm_dir, tmp_path, appends, torn):
    args = [sys.executable, "-c", SAMPLE_SCRIPT, str(tiny_causal_lm_dir)]
    run_ok(args + [str(tmp_path / "reference")])
    work = tmp_path / "killed" / "work" / "samples.jsonl"
    run_killed_at(args + [str(tmp_path / "killed")], "worklog.append", appends, tmp_path)
    assert lines(work) == 2 * appends  # exactly the chunks appended before the kill
    assert not (tmp_path / "killed" / "responses.jsonl").exists()
    if torn:
        tear_last_line(work)
    run_ok(args + [str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "responses.jsonl").read_text() == (tmp_path / "reference" / "responses.jsonl").read_text()
    ids = [row["id"] for row in read_jsonl(work)]
    assert len(ids) == len(set(ids)) == 16


LABEL_SCRIPT = """
import sys
from cai.constitution import load_constitution
from cai.engines.hf import HFEngine
from cai.labeling import LabelRun, LabelSettings, Pair
from cai.prompts import PromptSet
model, constitution, out = sys.argv[1:4]
prompt = ({"role": "user", "content": "Is it safe?"},)
pairs = [Pair(f"p{i}", prompt, f"yes {i} " * (i + 1), f"no {i}") for i in range(16)]
LabelRun(HFEngine(model, batch_size=2), load_constitution(constitution), pairs, PromptSet(), out,
         LabelSettings(mode="cot", cot_max_tokens=12, chunk_size=2, principles_per_pair=2), show_progress=False).run()
"""


@pytest.mark.parametrize("appends,torn", KILL_POINTS)
def test_label_stage_survives_sigkill(tiny_causal_lm_dir, tmp_path, appends, torn):
    from test_labeling import CONSTITUTION

    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    args = [sys.executable, "-c", LABEL_SCRIPT, str(tiny_causal_lm_dir), str(tmp_path / "c.yaml")]
    run_ok(args + [str(tmp_path / "reference")])
    work = tmp_path / "killed" / "work" / "labels.jsonl"
    run_killed_at(args + [str(tmp_path / "killed")], "worklog.append", appends, tmp_path)
    assert lines(work) == 2 * appends
    assert not (tmp_path / "killed" / "preferences.jsonl").exists()
    if torn:
        tear_last_line(work)
    run_ok(args + [str(tmp_path / "killed")])
    assert (tmp_path / "killed" / "preferences.jsonl").read_text() == (tmp_path / "reference" / "preferences.jsonl").read_text()
    ids = [row["id"] for row in read_jsonl(work)]
    assert len(ids) == len(set(ids)) == 16


BLEND_SCRIPT = """
import os, signal, sys
from cai.blend import blend, parse_source
source, out, kill_on_replace = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kill_on_replace:
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == kill_on_replace:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
blend([parse_source(source)], out, eval_fraction=0.25, seed=3)
"""


@pytest.mark.parametrize("kill_on_replace", [1, 2])
def test_blend_killed_between_files_reruns_to_the_same_split(tmp_path, kill_on_replace):
    from test_reward import write_pairs

    source = write_pairs(tmp_path / "human.jsonl", n=20)
    args = [sys.executable, "-c", BLEND_SCRIPT, str(source)]
    run_ok(args + [str(tmp_path / "reference"), "0"])
    proc = subprocess.run(args + [str(tmp_path / "killed"), str(kill_on_replace)], capture_output=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "eval.jsonl").exists()
    for leftover in (tmp_path / "killed").glob("*.jsonl"):  # whatever landed is whole, never a torn file
        [json.loads(line) for line in leftover.read_text().splitlines()]
    run_ok(args + [str(tmp_path / "killed"), "0"])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "reference" / name).read_text()


# Training: the kill lands right after checkpoint N is whole ("after"), or while checkpoint N is
# being written, before its trainer_state.json ("during"). The script counts optimiser steps run
# in this process so the test can tell a resume from a restart.
TRAIN_SCRIPT = """
import json, os, signal, sys
import transformers
from transformers.trainer_callback import CallbackHandler, TrainerState
kind, model, data, out, kill = sys.argv[1:6]
steps_run = [0]
real_step_end = CallbackHandler.on_step_end
def on_step_end(self, args, state, control):
    steps_run[0] += 1
    return real_step_end(self, args, state, control)
CallbackHandler.on_step_end = on_step_end
if kill != "none":
    moment, at = kill.split(":")
    real_save = transformers.Trainer._save_checkpoint
    def save(self, model, trial):
        if self.state.global_step == int(at) and moment == "during":
            TrainerState.save_to_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        real_save(self, model, trial)
        if self.state.global_step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    transformers.Trainer._save_checkpoint = save
from cai.lora import LoraSettings
from cai.train.policy import DPOSettings, TrainSettings, train_dpo, train_sft
from cai.train.reward import RewardSettings, train_reward_model
common = dict(lora=LoraSettings(r=4, alpha=8, dropout=0.0), learning_rate=1e-2, batch_size=2, max_steps=6, save_steps=2, max_length=128)
if kind == "rm":
    train_reward_model(data, model, out, RewardSettings(**common))
elif kind == "sft":
    train_sft(data, model, out, TrainSettings(**common))
else:
    train_dpo(data, model, out, DPOSettings(train=TrainSettings(**common)))
print(json.dumps({"steps_run": steps_run[0]}))
"""


# Each stage is killed once in the default run (a kill during a save and one after it, between
# them); the other combination of each is `slow` (~25 s apiece).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind,kill,resume_from", [
    pytest.param("rm", "after:2", 2, marks=SLOW), ("rm", "during:4", 2), ("sft", "during:2", None),
    pytest.param("sft", "after:4", 4, marks=SLOW), ("dpo", "after:2", 2), pytest.param("dpo", "during:4", 2, marks=SLOW),
])
def test_training_resumes_from_last_whole_checkpoint(tiny_causal_lm_dir, tiny_classifier_dir, tmp_path, kind, kill, resume_from):
    from test_policy import write_pairs as write_policy_pairs, write_sft
    from test_reward import write_pairs as write_rm_pairs

    model = tiny_classifier_dir if kind == "rm" else tiny_causal_lm_dir
    data = {"rm": write_rm_pairs, "sft": write_sft, "dpo": write_policy_pairs}[kind](tmp_path / "data.jsonl", n=16)
    args = [sys.executable, "-c", TRAIN_SCRIPT, kind, str(model), str(data)]
    assert json.loads(run_ok(args + [str(tmp_path / "reference"), "none"]).strip().splitlines()[-1])["steps_run"] == 6

    killed = tmp_path / "killed"
    proc = subprocess.run(args + [str(killed), kill], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    whole = latest_checkpoint(killed / "checkpoints")
    assert (int(Path(whole).name.split("-")[1]) if whole else None) == resume_from

    steps_run = json.loads(run_ok(args + [str(killed), "none"]).strip().splitlines()[-1])["steps_run"]
    assert steps_run == 6 - (resume_from or 0)
    reference = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_latest_checkpoint_skips_partial_saves_and_sorts_numerically(tmp_path):
    for step, whole in ((9, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if whole:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "missing") is None
