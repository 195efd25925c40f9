"""The eval's probes end to end through `evaluate_policy`, with policies and judges whose behaviour is
known: a sycophantic policy, a policy that refuses everything, a judge that never sees a refusal,
a judge that always prefers the longer answer. Then the recipe wiring, harness included."""

from __future__ import annotations

import json
from pathlib import Path


from cai.constitution import load_constitution
from cai.engines.base import ChoiceScores, Generation
from cai.eval_judge import load_calibration
from cai.eval_probes import SycophancySettings, XSTestSettings
from cai.eval_sycophancy import load_probes
from cai.evaluation import evaluate_policy
from cai.prompt_sets import Prompt
from cai.refusal import from_calibration, load_labelled_completions, load_xstest
from cai.report import write_report

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "cai" / "data" / "eval"
ITEMS = load_probes(str(DATA / "sycophancy.jsonl"), limit=8)
SAFETY = load_xstest(str(DATA / "xstest_style.jsonl"), limit=4)
REFUSAL = "I'm sorry, but I can't help with that."


def option_text(content: str, letter: str) -> str:
    return content[content.index(f"({letter}) ") + 4:].split("\n")[0]


class Policy:
    """Answers per adapter: "policy" and "baseline" behave as `behaviour[adapter](user_text)` says."""

    name, model = "fake", "policy-model"

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        out = []
        for prompt in prompts:
            text = self.behaviour[adapter](prompt.messages[-1]["content"])
            out.append(Generation([text], 5, [len(text.split())], ["stop"]))
        return out


class Judge:
    """Yes/no questions answered by `yes(content)`; A/B by `a_b(content)`."""

    name, model = "fake", "judge-model"

    def __init__(self, yes, a_b):
        self.yes, self.a_b = yes, a_b

    def score_choices(self, prompts, choices, adapter=None):
        content = [p.messages[-1]["content"] for p in prompts]
        probs = [self.a_b(c) if list(choices) == ["A", "B"] else self.yes(c) for c in content]
        return ChoiceScores(probs, [0.9] * len(prompts))


def never_yes(content):
    return [0.1, 0.9]


def prefer_longer(content):
    a, b = option_text(content, "A"), option_text(content, "B")
    return [0.9, 0.1] if len(a.split()) > len(b.split()) else [0.1, 0.9]


def answer_for(item_by_question, sycophantic: bool, refuse: bool, long: bool):
    def reply(text: str) -> str:
        for question, item in item_by_question.items():
            if text.startswith(question):
                wrong = sycophantic and "I think the answer is" in text
                return f"It is {(item.wrong if wrong else item.correct)[0]}."
        if refuse:
            return REFUSAL
        return "Sure, here is a clear and complete answer with several useful details." if long else "Sure."
    return reply


def run_eval(tmp_path, policy, baseline, judge, *, red=3, benign=3, completions=(), engine_class=None) -> dict:
    by_question = {item.question: item for item in ITEMS}
    engine = (engine_class or Policy)({"policy": answer_for(by_question, **policy), "baseline": answer_for(by_question, **baseline)})
    red_team = [Prompt(f"r{i}", ({"role": "user", "content": f"harmful request {i}"},)) for i in range(red)]
    benign_prompts = [Prompt(f"b{i}", ({"role": "user", "content": f"benign request {i}"},)) for i in range(benign)]
    calibration = load_calibration(DATA / "judge_calibration.jsonl")
    metrics = evaluate_policy(
        engine, lambda: judge, load_constitution(str(ROOT / "constitutions" / "harmless.yaml")), red_team, benign_prompts,
        tmp_path / "eval", policy_adapter="policy", baseline_adapter="baseline", harm_question="Is it harmful?",
        refusal_question="Does it refuse?", preference="Which is better?", calibration=calibration,
        sycophancy_items=ITEMS, sycophancy=SycophancySettings(), safety=SAFETY, xstest=XSTestSettings(),
        refusal_completions=list(completions) or from_calibration(calibration) + load_labelled_completions(DATA / "refusal_labels.jsonl"),
        log=lambda line: None)
    metrics.update(policy_stage="dpo", baseline="sft")
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    write_report(tmp_path, ["eval"])
    return metrics


PLAIN = dict(sycophantic=False, refuse=False, long=False)


def test_a_sycophantic_policy_flips_and_a_steadfast_baseline_does_not(tmp_path):
    metrics = run_eval(tmp_path, {**PLAIN, "sycophantic": True}, PLAIN, Judge(never_yes, prefer_longer))
    syc = metrics["sycophancy"]
    assert syc["items"] == 8 and syc["policy"]["rate"] == 1.0 and syc["policy"]["n"] == 8
    assert syc["baseline"]["rate"] == 0.0 and syc["baseline"]["accuracy_neutral"]["rate"] == 1.0
    assert syc["policy"]["ci95"][0] > 0.6 and syc["baseline"]["ci95"][1] < 0.4
    markdown = (tmp_path / "report.md").read_text()
    assert "| sycophancy: flips to the user's wrong belief | 0 [0, 0.324] (n=8) | 1 [0.676, 1] (n=8) |" in markdown


def test_refusals_are_read_by_the_validated_detector_not_a_judge_that_never_sees_one(tmp_path):
    metrics = run_eval(tmp_path, {**PLAIN, "refuse": True}, PLAIN, Judge(never_yes, prefer_longer))
    detectors = metrics["refusal_detectors"]
    labels = from_calibration(load_calibration(DATA / "judge_calibration.jsonl")) + load_labelled_completions(DATA / "refusal_labels.jsonl")
    share_compliant = round(sum(not c.refusal for c in labels) / len(labels), 4)
    # The measured failure of a small judge: never detects a refusal, accuracy = share of non-refusals.
    assert detectors["judge"]["recall"] == 0 and detectors["judge"]["accuracy"] == share_compliant and not detectors["judge"]["reliable"]
    assert detectors["string_match"]["reliable"] and detectors["primary"] == "string_match"
    xs = metrics["xstest"]
    assert xs["safe"] == 4 and xs["unsafe"] == 4
    assert xs["safe_refusal_rate"]["policy"]["string_match"]["rate"] == 1.0 and xs["safe_refusal_rate"]["baseline"]["string_match"]["rate"] == 0.0
    assert xs["unsafe_compliance_rate"]["policy"]["string_match"]["rate"] == 0.0
    assert xs["unsafe_compliance_rate"]["baseline"]["string_match"]["rate"] == 1.0
    assert xs["safe_refusal_rate"]["policy"]["judge"]["rate"] == 0.0  # the judge would call the refuser perfect
    assert metrics["over_refusal_rate_policy_string_match"]["rate"] == 1.0 and metrics["over_refusal_rate_policy"]["rate"] == 0.0
    markdown = (tmp_path / "report.md").read_text()
    leaned = [line for line in markdown.splitlines() if line.startswith("| XSTest-style: refuses safe prompts")]
    assert leaned[0].startswith("| XSTest-style: refuses safe prompts that look unsafe (phrase matcher, used) | 0 [0, 0.49] (n=4) | 1 [0.51, 1] (n=4) |")
    assert "**UNRELIABLE** LLM judge" in leaned[1] and "(LLM judge, shown, not used)" in leaned[1]
    assert "## Refusal detectors on human-labelled completions" in markdown


def test_a_judge_that_prefers_length_wins_raw_but_not_at_equal_length(tmp_path):
    # Against a 6-word baseline answer, the policy is longer by 1..16 words on 16 of 20 prompts and
    # shorter by 1..4 words on the other 4: a judge that prefers length gives it a raw 0.8.
    extra = {f"harmful request {i}": i + 1 for i in range(10)} | {f"benign request {i}": 11 + i for i in range(6)}
    extra |= {f"benign request {i}": 5 - i for i in range(6, 10)}

    def policy_reply(text):
        return " ".join(["word"] * (6 + extra[text]))

    def baseline_reply(text):
        return " ".join(["word"] * 6)

    by_question = {item.question: item for item in ITEMS}
    engine = Policy({"policy": lambda t: answer_for(by_question, False, False, False)(t) if t.startswith(tuple(by_question)) else policy_reply(t),
                     "baseline": lambda t: answer_for(by_question, False, False, False)(t) if t.startswith(tuple(by_question)) else baseline_reply(t)})
    red = [Prompt(f"r{i}", ({"role": "user", "content": f"harmful request {i}"},)) for i in range(10)]
    benign = [Prompt(f"b{i}", ({"role": "user", "content": f"benign request {i}"},)) for i in range(10)]
    metrics = evaluate_policy(engine, lambda: Judge(never_yes, prefer_longer), load_constitution(str(ROOT / "constitutions" / "harmless.yaml")),
                              red, benign, tmp_path / "eval", policy_adapter="policy", baseline_adapter="baseline",
                              harm_question="Is it harmful?", refusal_question="Does it refuse?", preference="Which is better?",
                              log=lambda line: None)
    raw = metrics["win_rate_labeller"]["all"]["rate"]
    controlled = metrics["win_rate_labeller_length_controlled"]
    assert raw == 0.8 and abs(controlled["rate"] - 0.5) < 0.15 and raw - controlled["rate"] > 0.2, controlled
    assert metrics["length_difference"]["mean"] > 0


RECIPE = """\
name: probed
model: {model}
output_dir: {out}
stages: [sft, dpo, eval]
threads: 1
engine: {{kind: hf, batch_size: 16}}
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 2}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 2}}]
  max_tokens: 4
  kl: {{max_tokens: 4}}
  sycophancy: {{limit: 3, max_tokens: 4}}
  xstest: {{limit: 2, max_tokens: 4}}
  harness: {{tasks: [cai_probe_mc], include_path: {tasks}, limit: 4, batch_size: 4}}
"""


def test_the_recipe_runs_every_probe_and_the_harness_on_policy_and_baseline(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """The eval stage of a recipe: shipped probe sets found from any folder, the harness run on the
    trained adapter and the SFT baseline, everything in metrics.json and the report."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai.recipe import load_recipe
    from cai.run import RecipeRunner

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"Which number is {n}?", "choices": [str(n), str(n + 1)], "label": 0} for n in range(6)]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "task.yaml").write_text(
        f"task: cai_probe_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    for stage, seed in (("sft", 1), ("dpo", 2)):
        import torch

        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), config).save_pretrained(tmp_path / "run" / stage / "adapter")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_causal_lm_dir, out=tmp_path / "run", tasks=tasks))
    monkeypatch.chdir(tmp_path)  # not the repository: shipped sets resolve through cai's own files
    RecipeRunner(load_recipe(recipe), log=lambda line: None).run(only="eval")
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["sycophancy"]["items"] == 3 and {"rate", "flip_from_correct"} <= set(metrics["sycophancy"]["policy"])
    assert metrics["xstest"]["safe"] == 2 and metrics["xstest"]["unsafe"] == 2
    assert metrics["refusal_detectors"]["n"] == 28 + 40 and metrics["refusal_detectors"]["primary"] in ("string_match", "judge")
    acc = metrics["harness"]["tasks"]["cai_probe_mc"]["acc"]
    assert 0 <= acc["policy"] <= 1 and 0 <= acc["baseline"] <= 1
    assert metrics["harness"]["models"]["baseline"]["adapter"] == str(tmp_path / "run" / "sft" / "adapter")
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| cai_probe_mc: acc |" in markdown and "sycophancy: flips to the user's wrong belief" in markdown


class BatchingPolicy(Policy):
    """`Policy` that also takes several sets in one call, as the vLLM engine does, and records
    which weights (adapter) every call ran on."""

    def __init__(self, behaviour):
        super().__init__(behaviour)
        self.calls = []

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        self.calls.append(("generate", adapter, len(prompts)))
        return super().generate(prompts, sampling, adapter, seeds)

    def generate_groups(self, groups, adapter=None):
        self.calls.append(("groups", adapter, [len(p) for p, _ in groups]))
        return [Policy.generate(self, p, s, adapter) for p, s in groups]


def test_each_models_answers_come_in_one_batch_and_give_the_same_metrics(tmp_path):
    """The eval's greedy sets (held-out prompts, sycophancy neutral and biased, XSTest) go to the
    engine as one batch per model, so merged weights are loaded twice instead of six times."""
    engines = []

    def batching(behaviour):
        engines.append(BatchingPolicy(behaviour))
        return engines[-1]

    behaviour = ({**PLAIN, "sycophantic": True}, PLAIN, Judge(never_yes, prefer_longer))
    plain = run_eval(tmp_path / "plain", *behaviour)
    batched = run_eval(tmp_path / "batched", *behaviour, engine_class=batching)
    assert batched == plain
    sets = [6, 8, 8, len(SAFETY)]  # 3 red-team + 3 benign, sycophancy neutral and biased, XSTest
    assert engines[0].calls == [("groups", "policy", sets), ("groups", "baseline", sets)]
    # A rerun finds every answer kept: no engine call at all.
    assert run_eval(tmp_path / "batched", *behaviour, engine_class=batching) == plain
    assert engines[1].calls == []
