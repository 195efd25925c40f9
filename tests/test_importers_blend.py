import csv
import gzip
import json
from pathlib import Path

import pytest

from cai import schema
from cai.blend import SourceSpec, blend, parse_source
from cai.data.importers import load_preferences
from cai.errors import CaiError
from cai.store import read_jsonl

HH = [
    {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help break into property; a locksmith can help.",
     "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Get a tension wrench and rake the pins."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 5."},
]
BROKEN = {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: different\n\nAssistant: C"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hh_multi_turn_prompt_is_the_shared_prefix(tmp_path):
    records, report = load_preferences(str(write_jsonl(tmp_path / "hh.jsonl", HH)))
    assert report.format == "hh" and report.imported == 2
    multi = records[1]
    assert multi["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert multi["chosen"] == [{"role": "assistant", "content": "4."}]
    assert multi["rejected"] == [{"role": "assistant", "content": "5."}]
    assert multi["chosen_prob"] == 1.0 and multi["source"] == "hh"
    for record in records:
        schema.validate_record("preference", record, "r")


def test_hh_gzip(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in HH).encode()))
    records, report = load_preferences(str(path))
    assert report.imported == 2 and records[0]["source"] == "hh"


def test_malformed_transcript_named_with_line_number(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH + [BROKEN])
    with pytest.raises(CaiError, match=r"hh.jsonl: 1 malformed row\(s\): .*hh.jsonl:3: 'chosen' and 'rejected' differ"):
        load_preferences(str(path))
    records, report = load_preferences(str(path), skip_malformed=True)
    assert len(records) == 2 and report.malformed == [f"{path}:3: 'chosen' and 'rejected' differ before the final Assistant turn"]


def test_trl_standard_and_conversational(tmp_path):
    standard = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}])
    conversational = write_jsonl(tmp_path / "conv.jsonl", [{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}])
    (a,), report_a = load_preferences(str(standard))
    (b,), _ = load_preferences(str(conversational))
    assert report_a.format == "trl"
    assert a["prompt"] == [{"role": "user", "content": "Q?"}] and a["chosen"][0]["content"] == "good"
    assert b["prompt"][0]["role"] == "system" and b["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_ultrafeedback_keeps_scores(tmp_path):
    row = {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
           "score_chosen": 8.5, "score_rejected": 3.0}
    (record,), report = load_preferences(str(write_jsonl(tmp_path / "uf.jsonl", [row])))
    assert report.format == "ultrafeedback"
    assert record["scores"] == {"chosen": 8.5, "rejected": 3.0} and record["prompt"] == [{"role": "user", "content": "Q?"}]


def test_csv_with_column_map(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "better", "worse", "confidence"])
        writer.writerow(["Q1?", "yes", "no", "0.8"])
        writer.writerow(["Q2?", "fine", "bad", ""])
    records, _ = load_preferences(str(path), columns={"prompt": "question", "chosen": "better", "rejected": "worse", "chosen_prob": "confidence"})
    assert [r["chosen_prob"] for r in records] == [0.8, 1.0]
    with pytest.raises(CaiError, match=r"pairs.csv:2: no 'q' column \(columns: better, confidence, question, worse\)"):
        load_preferences(str(path), columns={"prompt": "q"})


def test_datasets_directory_offline(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]).save_to_disk(str(tmp_path / "ds"))
    records, report = load_preferences(str(tmp_path / "ds"))
    assert report.format == "trl" and records[0]["chosen"][0]["content"] == "good"


def test_unknown_columns_named(tmp_path):
    with pytest.raises(CaiError, match="cannot tell the format from columns \\['a', 'b'\\]"):
        load_preferences(str(write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}])))


def test_schema_rejects_bad_rows_clearly():
    bad = {"id": "x", "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}], "chosen_prob": 0.3, "source": "s", "provenance": {"stage": "import"}}
    with pytest.raises(CaiError, match=r"f.jsonl:7: field 'chosen_prob': must be at least 0.5, got 0.3"):
        schema.validate_record("preference", bad, "f.jsonl:7")
    with pytest.raises(CaiError, match="field 'chosen\\[0\\].role'"):
        schema.validate_record("preference", {**bad, "chosen_prob": 1.0, "chosen": [{"role": "user", "content": "a"}]}, "f")


# -- blending ----------------------------------------------------------------------------------------


def ai_record(prompt, chosen, rejected, prob=0.7):
    from cai.store import stable_id

    return {"id": stable_id(prompt, chosen, rejected), "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}],
            "chosen_prob": prob, "source": "ai", "position_consistent": True, "provenance": {"stage": "label"}}


def human_rows(n):
    return [{"prompt": f"human q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_parse_source():
    assert parse_source("a/b.jsonl:0.5") == SourceSpec("a/b.jsonl", 0.5)
    assert parse_source("a/b.jsonl") == SourceSpec("a/b.jsonl", 1.0)
    with pytest.raises(CaiError):
        parse_source("a.jsonl:-1")


def test_blend_dedupe_conflicts_and_split(tmp_path):
    human = write_jsonl(tmp_path / "human.jsonl", human_rows(20) + human_rows(2))  # two exact duplicates
    ai_rows = [ai_record(f"ai q{i}", f"x{i}", f"y{i}") for i in range(30)]
    ai_rows.append(ai_record("human q0", "bad 0", "good 0", prob=0.9))  # disagrees with the human
    ai_rows.append(ai_record("human q1", "good 1", "bad 1"))  # agrees: a duplicate triple
    ai = write_jsonl(tmp_path / "ai.jsonl", ai_rows)
    summary = blend([SourceSpec(str(ai)), SourceSpec(str(human))], tmp_path / "out", eval_fraction=0.1, seed=0)
    stats = {Path(s["source"]).stem: s for s in summary["sources"]}
    assert stats["human"]["duplicates"] == 2 and stats["human"]["after_dedupe"] == 20
    assert stats["ai"]["duplicates"] == 1 and stats["ai"]["conflicts_lost"] == 1 and stats["ai"]["after_dedupe"] == 30
    assert summary["conflicts"] == {"human_vs_ai": 1, "same_kind": 0}
    train = list(read_jsonl(tmp_path / "out" / "train.jsonl"))
    evaluation = list(read_jsonl(tmp_path / "out" / "eval.jsonl"))
    assert stats["human"]["eval"] == 2 and stats["ai"]["eval"] == 3 and len(evaluation) == 5
    assert len(train) == 45
    assert not {r["id"] for r in train} & {r["id"] for r in evaluation}
    q0 = [r for r in train + evaluation if r["prompt"][0]["content"] == "human q0"]
    assert len(q0) == 1 and q0[0]["chosen"][0]["content"] == "good 0" and q0[0]["source"] == "human"


def test_blend_weights_and_counts(tmp_path):
    human = write_jsonl(tmp_path / "human.jsonl", human_rows(40))
    ai = write_jsonl(tmp_path / "ai.jsonl", [ai_record(f"q{i}", "x", "y") for i in range(40)])
    summary = blend([SourceSpec(str(human), 0.25), SourceSpec(str(ai), 2.0)], tmp_path / "w", eval_fraction=0.0)
    sources = [r["source"] for r in read_jsonl(tmp_path / "w" / "train.jsonl")]
    assert sources.count("human") == 10 and sources.count("ai") == 80 and summary["train"] == 90
    blend([SourceSpec(str(human), 7), SourceSpec(str(ai), 50)], tmp_path / "c", by="counts", eval_fraction=0.0)
    sources = [r["source"] for r in read_jsonl(tmp_path / "c" / "train.jsonl")]
    assert sources.count("human") == 7 and sources.count("ai") == 50
    blend([SourceSpec(str(human), 0.25), SourceSpec(str(ai), 2.0)], tmp_path / "w2", eval_fraction=0.0)
    assert (tmp_path / "w" / "train.jsonl").read_text() == (tmp_path / "w2" / "train.jsonl").read_text()


def test_blend_output_feeds_trl_reward_and_dpo_trainers(tmp_path, tiny_causal_lm_dir, tiny_classifier_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from cai import runtime

    human = write_jsonl(tmp_path / "human.jsonl", human_rows(6))
    ai = write_jsonl(tmp_path / "ai.jsonl", [ai_record(f"q{i}", "x", "y") for i in range(6)])
    blend([SourceSpec(str(human)), SourceSpec(str(ai))], tmp_path / "b", eval_fraction=0.0)
    dataset = datasets.load_dataset("json", data_files=str(tmp_path / "b" / "train.jsonl"), split="train")
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to="none", logging_steps=1, save_strategy="no",
                  **runtime.training_overrides("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    reward = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=1),
        args=RewardConfig(output_dir=str(tmp_path / "rm"), **common),
        train_dataset=dataset, processing_class=tokenizer,
    )
    assert reward.train().training_loss > 0
    dpo = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny_causal_lm_dir),
    )
    assert dpo.train().training_loss > 0


def test_eval_split_holds_out_whole_prompts_across_sources(tmp_path):
    """k = 4 samples labelled with `pairing: all` give 6 pairs per prompt; a human file asks some
    of the same questions. No prompt may be both trained on and evaluated on."""
    ai_rows = [ai_record(f"q{i}", f"answer {a} to {i}", f"answer {b} to {i}")
               for i in range(10) for a in range(4) for b in range(a + 1, 4)]
    ai = write_jsonl(tmp_path / "ai.jsonl", ai_rows)
    human = write_jsonl(tmp_path / "human.jsonl", [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(0, 20, 2)])
    summary = blend([SourceSpec(str(ai)), SourceSpec(str(human))], tmp_path / "out", eval_fraction=0.2, seed=0)
    train = list(read_jsonl(tmp_path / "out" / "train.jsonl"))
    evaluation = list(read_jsonl(tmp_path / "out" / "eval.jsonl"))
    train_prompts = {r["prompt"][0]["content"] for r in train}
    eval_prompts = {r["prompt"][0]["content"] for r in evaluation}
    assert eval_prompts and not train_prompts & eval_prompts
    stats = {Path(s["source"]).stem: s for s in summary["sources"]}
    assert stats["ai"]["eval_prompts"] == 2 and stats["ai"]["eval"] == 12  # every pair of a held-out prompt
    assert stats["human"]["eval_prompts"] == 2 and len(train) + len(evaluation) == 70


HH_BAD = [
    {"chosen": "\n\nHuman: Say hi\n\nAssistant:", "rejected": "\n\nHuman: Say hi\n\nAssistant: Hi!"},  # empty final turn
    BROKEN,  # the transcripts differ before the last turn
]


def test_blend_skips_and_lists_malformed_rows_when_asked(tmp_path, monkeypatch):
    hh = write_jsonl(tmp_path / "hh.jsonl", HH + HH_BAD)
    with pytest.raises(CaiError, match="2 malformed row"):
        blend([SourceSpec(str(hh))], tmp_path / "strict")
    summary = blend([SourceSpec(str(hh), skip_malformed=True)], tmp_path / "out", eval_fraction=0.0)
    expected = [{"row": 3, "reason": "'chosen' has an empty final Assistant turn"},
                {"row": 4, "reason": "'chosen' and 'rejected' differ before the final Assistant turn"}]
    source = summary["sources"][0]
    assert source["malformed_skipped"] == 2 and source["malformed_rows"] == expected and source["read"] == 2
    assert summary["train"] == 2 and json.loads((tmp_path / "out" / "summary.json").read_text())["malformed_skipped"] == 2
    # The recipe key reaches the blend through `cai run`.
    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\noutput_dir: {tmp_path / 'run'}\nstages: [blend]\n"
                      f"blend:\n  eval_fraction: 0.0\n  sources: [{{path: {hh}, skip_malformed: true}}]\n")
    logs = []
    RecipeRunner(load_recipe(recipe), log=logs.append).run()
    written = json.loads((tmp_path / "run" / "blend" / "summary.json").read_text())
    assert written["sources"][0]["malformed_rows"] == expected
    assert any("skipped 2 malformed row(s)" in line and "rows 3, 4" in line for line in logs)


def run_cai(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent, timeout=300)


def test_cai_blend_command(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", HH + HH_BAD)
    ai = write_jsonl(tmp_path / "ai.jsonl", [ai_record(f"q{i}", "x", "y") for i in range(10)])
    result = run_cai("blend", f"{hh}:1", f"{ai}:0.5", "--out", str(tmp_path / "out"), "--skip-malformed", "--eval-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "eval.jsonl", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["malformed_skipped"] == 2 and summary["train"] + summary["eval"] == len(list(read_jsonl(tmp_path / "out" / "train.jsonl"))) + len(list(read_jsonl(tmp_path / "out" / "eval.jsonl")))
    assert "skipped 2 malformed row(s)" in result.stdout and "row 3: 'chosen' has an empty final Assistant turn" in result.stdout
    assert "conflicts: 0 human-vs-AI" in result.stdout
    strict = run_cai("blend", str(hh), "--out", str(tmp_path / "strict"))
    assert strict.returncode == 2 and "2 malformed row(s)" in strict.stderr and "Traceback" not in strict.stderr


class ScriptedEngine:
    """Answers by the request: a critique, a revision or else an initial answer (no model needed)."""

    name, model = "scripted", "scripted"

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        from cai.engines.base import Generation

        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            last = prompt.messages[-1]["content"]
            text = ("It helps with harm." if "Point out harm" in last else
                    "I would rather suggest a safer option." if "Remove it" in last else "Sure, here is a detailed plan.")
            out.append(Generation(texts=[text] * sampling.n, prompt_tokens=1, completion_tokens=[5] * sampling.n,
                                  finish_reasons=["stop"] * sampling.n))
        return out


def test_training_rows_carry_the_prompt_the_sampler_sends(tmp_path):
    """One choice: the constitution's system prompt steers the critique conversation only; SFT
    rows and critique pairs carry the prompt as sampling (and PPO, evaluation) send it, so
    critique pairs and AI labels for one question also meet in the blend."""
    from cai.constitution import loads_constitution
    from cai.critique import CritiqueRun, CritiqueSettings
    from cai.engines.base import SamplingSettings
    from cai.prompt_sets import Prompt
    from cai.prompts import PromptSet
    from cai.sampling import SampleSettings, run_sampling

    constitution = loads_constitution(
        "name: t\nsystem: You are a careful assistant.\nprinciples:\n  - {id: harm, critique: Point out harm., revision: Remove it.}\n"
        "preferences:\n  - {id: p, text: \"Which is less harmful?\"}\n", "t.yaml")
    prompts = [Prompt(id="p0", messages=({"role": "user", "content": "How do I pick a lock?"},)),
               Prompt(id="p1", messages=({"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi?"}))]
    critique_engine = ScriptedEngine()
    CritiqueRun(critique_engine, constitution, prompts, PromptSet(), tmp_path / "critique",
                CritiqueSettings(rounds=1, few_shot=0), show_progress=False).run()
    assert critique_engine.calls[0][0].messages[0] == {"role": "system", "content": "You are a careful assistant."}  # critique uses it
    sampler = ScriptedEngine()
    run_sampling(sampler, prompts, tmp_path / "sample", SampleSettings(k=2, sampling=SamplingSettings(max_tokens=8)), show_progress=False)
    sent = [list(p.messages) for p in sampler.calls[0]]
    sft = [row["messages"][:-1] for row in read_jsonl(tmp_path / "critique" / "sft.jsonl")]
    pairs = [row["prompt"] for row in read_jsonl(tmp_path / "critique" / "preferences.jsonl")]
    responses = [row["prompt"] for row in read_jsonl(tmp_path / "sample" / "responses.jsonl")]
    assert sft == sent and pairs == sent and responses == sent
    assert sent == [[dict(m) for m in p.messages] for p in prompts]
