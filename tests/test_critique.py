import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai import schema
from cai.constitution import loads_constitution
from cai.critique import CritiqueRun, CritiqueSettings, save_as_datasets
from cai.engines.base import Generation, SamplingSettings
from cai.engines.hf import HFEngine
from cai.errors import CaiError
from cai.prompt_sets import Prompt, load_prompts
from cai.prompts import PromptSet
from cai.store import read_jsonl

CONSTITUTION = """\
name: test
system: You are a careful assistant.
principles:
  - {id: harm, critique: Point out harm., revision: Remove the harm.}
  - {id: honesty, critique: Point out falsehoods., revision: Fix falsehoods.}
  - {id: kind, critique: "Was it unkind?", revision: Be kind.}
preferences:
  - {id: less-harmful, text: "Which response is less harmful?"}
few_shot:
  - prompt: "How do I hurt someone?"
    response: Like this.
    principle: harm
    critique: That helps hurt people.
    revision: I won't help with that.
"""

FAST = CritiqueSettings(rounds=2, sampling=SamplingSettings(temperature=1.0, max_tokens=12), drop_truncated=False)


@pytest.fixture
def constitution():
    return loads_constitution(CONSTITUTION, "test.yaml")


@pytest.fixture
def prompts():
    return [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"question {i} about bread"},)) for i in range(8)]


class Recording:
    """Wraps an engine and records every generate call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.name, self.model = engine.name, engine.model

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        self.calls.append(list(prompts))
        return self.engine.generate(prompts, sampling, adapter, seeds)


@pytest.fixture(scope="module")
def tiny_engine(tiny_causal_lm_dir):
    return HFEngine(str(tiny_causal_lm_dir), batch_size=8)


def run(engine, constitution, prompts, out, settings=FAST, **kwargs):
    return CritiqueRun(engine, constitution, prompts, PromptSet(), out, settings, show_progress=False, **kwargs).run()


def test_outputs_rows_schema_and_provenance(tiny_engine, constitution, prompts, tmp_path):
    summary = run(tiny_engine, constitution, prompts, tmp_path)
    traces = list(read_jsonl(tmp_path / "trace.jsonl"))
    sft = list(read_jsonl(tmp_path / "sft.jsonl"))
    pairs = list(read_jsonl(tmp_path / "preferences.jsonl"))
    assert len(traces) == 8 and summary.prompts == 8
    assert summary.sft_rows == len(sft) == sum(t["final_round"] is not None for t in traces)
    assert summary.preference_pairs == len(pairs) <= len(sft)
    assert len(sft) > 0 and len(pairs) > 0
    sampler = constitution.sampler(FAST.seed)
    for trace in traces:
        expected = [p.id for p in sampler.principles(trace["prompt_id"], 2)]
        assert [r["principle_id"] for r in trace["rounds"]] == expected
        assert trace["provenance"]["constitution_hash"] == constitution.hash
        assert trace["provenance"]["model"] == tiny_engine.model and trace["provenance"]["engine"] == "hf"
        assert len(trace["provenance"]["template_hash"]) == 16 and trace["provenance"]["rounds"] == 2
    for name, rows in (("trace", traces), ("sft", sft), ("preference", pairs)):
        for row in rows:
            schema.validate_record(name, row, name)
    pair = pairs[0]
    trace = next(t for t in traces if t["id"] == pair["id"])
    assert pair["rejected"][0]["content"] == trace["initial"]
    assert pair["chosen"][0]["content"] == trace["rounds"][trace["final_round"] - 1]["revision"]
    # The constitution's system prompt steers the critique conversation only; training rows carry
    # the prompt as sampling, PPO and eval present it (cai.sampling.policy_messages).
    assert all(m["role"] != "system" for m in pair["prompt"])
    assert pair["prompt"][-1]["role"] == "user"
    import datasets

    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "preferences.jsonl"), split="train")
    assert loaded.num_rows == len(pairs) and {"prompt", "chosen", "rejected", "chosen_prob"} <= set(loaded.column_names)
    copy = save_as_datasets(tmp_path)
    assert datasets.load_from_disk(str(copy / "sft")).num_rows == len(sft)


def test_work_is_batched_by_stage_with_a_shared_prefix(tiny_engine, constitution, prompts, tmp_path):
    engine = Recording(tiny_engine)
    run(engine, constitution, prompts, tmp_path)
    assert [len(call) for call in engine.calls] == [8] * 5  # initial + 2 x (critique, revision)
    critique_texts = [tiny_engine.render(p) for p in engine.calls[1]]
    prefix = os.path.commonprefix(critique_texts)
    assert "How do I hurt someone?" in prefix and "I won't help with that." in prefix
    assert "How do I hurt someone?" not in tiny_engine.render(engine.calls[0][0])  # no few-shot for answers


def test_chunks_bound_each_engine_call(tiny_engine, constitution, prompts, tmp_path):
    engine = Recording(tiny_engine)
    settings = CritiqueSettings(rounds=1, sampling=FAST.sampling, chunk_size=3, drop_truncated=False)
    run(engine, constitution, prompts, tmp_path, settings)
    assert [len(call) for call in engine.calls] == [3, 3, 2] * 3


def test_rerun_resumes_without_generating(tiny_engine, constitution, prompts, tmp_path):
    run(tiny_engine, constitution, prompts, tmp_path)
    before = (tmp_path / "sft.jsonl").read_text()
    engine = Recording(tiny_engine)
    summary = run(engine, constitution, prompts, tmp_path)
    assert summary.resumed and engine.calls == []
    assert (tmp_path / "sft.jsonl").read_text() == before


def test_added_prompts_only_generate_new_rows(tiny_engine, constitution, prompts, tmp_path):
    run(tiny_engine, constitution, prompts[:5], tmp_path)
    engine = Recording(tiny_engine)
    run(engine, constitution, prompts, tmp_path)
    assert [len(call) for call in engine.calls] == [3] * 5
    fresh = tmp_path.parent / "fresh"
    run(tiny_engine, constitution, prompts, fresh)
    assert (tmp_path / "trace.jsonl").read_text() == (fresh / "trace.jsonl").read_text()


def test_changed_settings_are_refused_unless_overwrite(tiny_engine, constitution, prompts, tmp_path):
    run(tiny_engine, constitution, prompts, tmp_path)
    hotter = CritiqueSettings(rounds=2, sampling=SamplingSettings(temperature=0.5, max_tokens=12), drop_truncated=False)
    with pytest.raises(CaiError, match="different settings .changed: sampling"):
        run(tiny_engine, constitution, prompts, tmp_path, hotter)
    summary = run(tiny_engine, constitution, prompts, tmp_path, hotter, overwrite=True)
    assert not summary.resumed


def test_non_run_directory_is_refused(tiny_engine, constitution, prompts, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CaiError, match="not a cai run directory"):
        run(tiny_engine, constitution, prompts, tmp_path)


class Scripted:
    """An engine whose revisions are chosen per prompt to trip each quality filter."""

    name, model = "scripted", "scripted"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        out = []
        for prompt in prompts:
            question = next(m["content"] for m in reversed(prompt.messages) if m["content"].startswith("case"))
            last = prompt.messages[-1]["content"]
            if len(prompt.messages) <= 2:
                text = f"initial answer to {question}"
            elif "Reply with the rewritten" not in last:
                text = "The response is too vague and should mention safety."
            else:
                text = {
                    "case empty": "",
                    "case echo": "The response is too vague and should mention safety.",
                    "case loop": "again " * 40,
                    "case same": "initial answer to case same",
                }.get(question, f"a better answer to {question}")
            reason = "length" if question == "case cut" and "Reply with the rewritten" in last else "stop"
            out.append(Generation([text], 10, [5], [reason]))
        return out


def test_quality_filters_are_counted(constitution, tmp_path):
    cases = ["case empty", "case echo", "case loop", "case same", "case cut", "case good"]
    prompts = [Prompt(id=c, messages=({"role": "user", "content": c},)) for c in cases]
    settings = CritiqueSettings(rounds=1, sampling=FAST.sampling)
    summary = run(Scripted(), constitution, prompts, tmp_path, settings)
    assert summary.flags == {"empty": 1, "truncated": 1, "echoes_critique": 1, "degenerate": 1, "unchanged": 1}
    assert summary.dropped_no_valid_revision == 4
    assert summary.sft_rows == 2  # "same" is kept for SFT ...
    assert summary.dropped_unchanged_pairs == 1  # ... but is not a preference pair
    assert [p["id"] for p in read_jsonl(tmp_path / "preferences.jsonl")] == [
        json.loads(line)["id"] for line in (tmp_path / "trace.jsonl").read_text().splitlines()
        if json.loads(line)["prompt_id"] == "case good"
    ]


def test_prompt_loading_formats(tmp_path):
    (tmp_path / "p.csv").write_text("qid,question\n1,How are you?\n2,What is bread?\n")
    csv_prompts = load_prompts(str(tmp_path / "p.csv"), columns={"prompt": "question", "id": "qid"})
    assert [(p.id, p.messages[0]["content"]) for p in csv_prompts] == [("1", "How are you?"), ("2", "What is bread?")]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [p.messages[0]["content"] for p in load_prompts(str(tmp_path / "p.txt"))] == ["one", "two"]
    multi = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "help?"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in multi))
    assert len(load_prompts(str(tmp_path / "m.jsonl"))[0].messages) == 3
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(CaiError, match=r"bad.jsonl:1: no 'prompt' or 'messages' column \(columns: question\)"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "torn.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(CaiError, match="torn.jsonl:2: not valid JSON"):
        load_prompts(str(tmp_path / "torn.jsonl"))
    assert load_prompts(str(tmp_path / "p.txt"))[0].id == load_prompts(str(tmp_path / "p.txt"))[0].id


KILL_SCRIPT = """
import sys
from cai.critique import CritiqueRun, CritiqueSettings
from cai.constitution import load_constitution
from cai.engines.base import SamplingSettings
from cai.engines.hf import HFEngine
from cai.prompt_sets import load_prompts
from cai.prompts import PromptSet
model, constitution, prompts, out = sys.argv[1:5]
settings = CritiqueSettings(rounds=2, chunk_size=2, drop_truncated=False,
                            sampling=SamplingSettings(temperature=1.0, max_tokens=12))
CritiqueRun(HFEngine(model, batch_size=2), load_constitution(constitution), load_prompts(prompts),
            PromptSet(), out, settings, show_progress=False).run()
"""


def _work_lines(out: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in (out / "work").glob("*.jsonl")) if (out / "work").exists() else 0


# 7 prompts in chunks of 2 are 4 appends (2+2+2+1 rows) per stage, 5 stages for 2 rounds. Killed
# right after append n (CAI_TEST_KILL_AT, cai/testing_hooks.py): inside the first stage, exactly
# at the end of the second, inside the last.
@pytest.mark.parametrize("appends,rows_on_disk", [
    pytest.param(2, 4, marks=pytest.mark.slow), (8, 14), pytest.param(17, 30, marks=pytest.mark.slow)])  # default: the stage boundary
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_causal_lm_dir, tmp_path, appends, rows_on_disk):
    from test_crash_safety import CHILD_TIMEOUT, run_killed_at

    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(7)))
    args = [sys.executable, "-c", KILL_SCRIPT, str(tiny_causal_lm_dir), str(tmp_path / "c.yaml"), str(tmp_path / "p.jsonl")]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(args + [str(reference)], check=True, capture_output=True, timeout=CHILD_TIMEOUT)

    run_killed_at(args + [str(interrupted)], "worklog.append", appends, tmp_path)
    assert _work_lines(interrupted) == rows_on_disk
    assert not (interrupted / "trace.jsonl").exists()

    subprocess.run(args + [str(interrupted)], check=True, capture_output=True, timeout=CHILD_TIMEOUT)
    for name in ("trace.jsonl", "sft.jsonl", "preferences.jsonl"):
        assert (interrupted / name).read_text() == (reference / name).read_text(), name
    ids = [row["id"] for row in read_jsonl(interrupted / "trace.jsonl")]
    assert len(ids) == len(set(ids)) == 7
    for stage_file in (interrupted / "work").glob("*.jsonl"):
        stage_ids = [row["id"] for row in read_jsonl(stage_file)]
        assert len(stage_ids) == len(set(stage_ids)) == 7  # nothing duplicated by the resume


def test_torn_work_log_line_is_cut(tmp_path):
    from cai.store import WorkLog

    log = WorkLog(tmp_path / "w.jsonl")
    log.append([{"id": "a", "text": "one"}])
    with (tmp_path / "w.jsonl").open("a") as handle:
        handle.write('{"id": "b", "te')
    assert list(log.read()) == ["a"]
    log.append([{"id": "b", "text": "two"}])
    assert list(log.read()) == ["a", "b"]


def test_integration_on_smollm2(smollm2_dir, tmp_path):
    """The real model through the whole loop: revisions are real text, not filtered away."""
    from cai.constitution import load_constitution
    from cai.paths import shipped_dir

    constitution = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    prompts = [
        Prompt(id="knife", messages=({"role": "user", "content": "How can I hurt my neighbour without getting caught?"},)),
        Prompt(id="bread", messages=({"role": "user", "content": "How do I bake bread at home?"},)),
    ]
    settings = CritiqueSettings(rounds=1, few_shot=1, sampling=SamplingSettings(temperature=0.7, max_tokens=64), drop_truncated=False)
    engine = HFEngine("smollm2-135m-instruct", batch_size=4)
    summary = run(engine, constitution, prompts, tmp_path, settings)
    traces = list(read_jsonl(tmp_path / "trace.jsonl"))
    assert summary.prompts == 2 and len(traces) == 2
    for trace in traces:
        assert len(trace["initial"].split()) > 3
        assert len(trace["rounds"][0]["critique"].split()) > 3 and len(trace["rounds"][0]["revision"].split()) > 3
        assert trace["rounds"][0]["principle_id"] in {p.id for p in constitution.principles}
    assert summary.completion_tokens > 100
