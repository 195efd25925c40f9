"""Evaluation: the sampled KL estimate, the judge's calibration, and which judge is asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cai.constitution import load_constitution
from cai.engines.base import ChoiceScores, Generation
from cai.errors import CaiError
from cai.eval_judge import RELIABLE_LOWER_BOUND, load_calibration
from cai.eval_kl import KLSettings, estimate_kl, sampled_kl, sequence_logprobs
from cai.evaluation import evaluate_policy
from cai.prompt_sets import Prompt
from cai.recipe import load_recipe
from cai.report import write_report
from cai.run import RecipeRunner

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "cai" / "data" / "eval" / "judge_calibration.jsonl"
PROMPTS = [Prompt(f"p{i}", ({"role": "user", "content": text},)) for i, text in
           enumerate(["How do I bake bread?", "Which of these responses is less harmful?", "Score the response."])]


# -- KL ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the test machine's cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_causal_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kl-adapters")
    return {name: save_adapter(tiny_causal_lm_dir, root / name, seed) for name, seed in (("policy", 1), ("other", 2))}


def two_adapter_model(model_dir, policy, reference):
    from peft import PeftModel

    from cai.loading import load_causal_lm, load_tokenizer

    lm = PeftModel.from_pretrained(load_causal_lm(str(model_dir)), str(policy), adapter_name="policy")
    if reference is not None:
        lm.load_adapter(str(reference), adapter_name="reference")
    return lm.eval(), load_tokenizer(str(model_dir))


class NoRoundTrip:
    """A tokenizer whose decode is not the inverse of its encode (decode -> encode changes the ids)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def decode(self, ids, **kwargs):
        return " " + self._inner.decode(ids, **kwargs).upper() + " "

    def batch_decode(self, batch, **kwargs):
        return [self.decode(ids, **kwargs) for ids in batch]


def test_kl_of_a_model_to_itself_is_exactly_zero(tiny_causal_lm_dir, adapters, tmp_path):
    summary = estimate_kl(str(tiny_causal_lm_dir), str(adapters["policy"]), PROMPTS, tmp_path / "kl.json",
                          reference_adapter=str(adapters["policy"]), reference_name="sft",
                          settings=KLSettings(samples_per_prompt=3, batch_size=4), max_tokens=12, seed=0, threads=1)
    assert summary["mean"] == 0.0 and summary["ci95"] == (0.0, 0.0) and summary["n"] == 9
    assert summary["label"] == "KL(policy || sft), nats per response, 9 samples" and summary["device"] == "cpu"
    rows = json.loads((tmp_path / "kl.json").read_text())["rows"]
    assert all(r["policy_logprob"] == r["reference_logprob"] for r in rows) and sum(len(r["token_ids"]) for r in rows) > 9


def test_kl_to_a_perturbed_adapter_is_positive_and_cached(tiny_causal_lm_dir, adapters, tmp_path, monkeypatch):
    args = (str(tiny_causal_lm_dir), str(adapters["policy"]), PROMPTS, tmp_path / "kl.json")
    settings = dict(reference_adapter=str(adapters["other"]), settings=KLSettings(samples_per_prompt=8, batch_size=8),
                    max_tokens=12, seed=0, threads=1, adapter_digests=["p", "o"])
    summary = estimate_kl(*args, **settings)
    assert summary["mean"] > 0 and summary["ci95"][0] > 0 and summary["n"] == 24
    to_base = estimate_kl(*args[:3], tmp_path / "kl-base.json", settings=KLSettings(samples_per_prompt=8), max_tokens=12, threads=1)
    assert to_base["mean"] > 0 and to_base["label"].startswith("KL(policy || base)")

    import cai.loading

    def no_loading(*a, **k):
        raise AssertionError("the kept samples were not reused")

    monkeypatch.setattr(cai.loading, "load_causal_lm", no_loading)
    assert estimate_kl(*args, **settings) == summary


def test_kl_reads_the_sampled_ids_not_a_decoded_round_trip(tiny_causal_lm_dir, adapters):
    lm, tokenizer = two_adapter_model(tiny_causal_lm_dir, adapters["policy"], adapters["other"])
    run = dict(policy="policy", reference="reference", samples_per_prompt=4, max_tokens=12, batch_size=6, seed=3)
    plain = sampled_kl(lm, tokenizer, PROMPTS, **run)
    odd = sampled_kl(lm, NoRoundTrip(tokenizer), PROMPTS, **run)
    assert [r["policy_logprob"] - r["reference_logprob"] for r in odd] == [r["policy_logprob"] - r["reference_logprob"] for r in plain]
    # The log-probabilities are those of the very ids that were sampled.
    from cai import chat

    prompt_ids = tokenizer(chat.render(tokenizer, PROMPTS[0].messages), add_special_tokens=False)["input_ids"]
    lm.set_adapter("policy")
    assert sequence_logprobs(lm, [prompt_ids], [plain[0]["token_ids"]], tokenizer.pad_token_id) == [plain[0]["policy_logprob"]]


def test_kl_samples_come_from_the_policy_distribution(tiny_causal_lm_dir, adapters):
    """One-token answers: the Monte-Carlo mean matches the exact KL over the vocabulary, which a
    greedy, top-k or tempered sampler would not."""
    from cai import chat

    lm, tokenizer = two_adapter_model(tiny_causal_lm_dir, adapters["policy"], adapters["other"])
    prompt = PROMPTS[:1]
    rows = sampled_kl(lm, tokenizer, prompt, policy="policy", reference="reference", samples_per_prompt=4000, max_tokens=1,
                      batch_size=1000, seed=0)
    ids = torch.tensor([tokenizer(chat.render(tokenizer, prompt[0].messages), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lm.set_adapter("policy")
        log_p = torch.log_softmax(lm(input_ids=ids).logits[0, -1].double(), -1)
        lm.set_adapter("reference")
        log_q = torch.log_softmax(lm(input_ids=ids).logits[0, -1].double(), -1)

    def close_to(values, expected):
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
        return abs(mean - expected) < 3 * sd / math.sqrt(len(values))

    exact_kl = float((log_p.exp() * (log_p - log_q)).sum())
    assert exact_kl > 0.05 and close_to([r["policy_logprob"] - r["reference_logprob"] for r in rows], exact_kl)
    # E[log p(y)] = -entropy: a sampler favouring likely tokens (lower temperature, top-k) overshoots it.
    assert close_to([r["policy_logprob"] for r in rows], float((log_p.exp() * log_p).sum()))


# -- the judge's calibration ----------------------------------------------------------------------
def option_text(content: str, letter: str) -> str:
    return content[content.index(f"({letter}) ") + 4 :].split("\n")[0]


class FakeJudge:
    """A policy engine (fixed answers) and a judge whose verdicts come from `verdict`."""

    name = "fake"

    def __init__(self, model: str, yes_no, a_b):
        self.model, self.yes_no, self.a_b = model, yes_no, a_b

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        return [Generation([f"{adapter} answer {i}"], 5, [3], ["stop"]) for i, _ in enumerate(prompts)]

    def score_choices(self, prompts, choices, adapter=None):
        content = [p.messages[-1]["content"] for p in prompts]
        self.seen = getattr(self, "seen", []) + content
        probs = [self.a_b(c) if list(choices) == ["A", "B"] else self.yes_no(c) for c in content]
        return ChoiceScores(probs, [0.9] * len(prompts))


def always_yes() -> FakeJudge:
    return FakeJudge("always-yes", lambda c: [0.9, 0.1], lambda c: [0.9, 0.1])


def oracle() -> FakeJudge:
    """Reads the calibration labels: Yes exactly when the shown answer is labelled yes; prefers
    the answer labelled no (the harmless or helpful one) wherever it is shown."""
    labels = {r.response: r.label for r in load_calibration(CALIBRATION)}

    def yes_no(content):
        shown = content.split("Assistant's final response: ", 1)[1].split("\n\n")[0]
        return [0.9, 0.1] if labels.get(shown) else [0.1, 0.9]

    def a_b(content):
        return [0.9, 0.1] if labels.get(option_text(content, "A")) is False else [0.1, 0.9]

    return FakeJudge("oracle", yes_no, a_b)


def evaluate_with(judge, out: Path) -> dict:
    red = [Prompt(f"r{i}", ({"role": "user", "content": f"harmful request {i}"},)) for i in range(3)]
    benign = [Prompt(f"b{i}", ({"role": "user", "content": f"benign request {i}"},)) for i in range(3)]
    policy = FakeJudge("policy-model", lambda c: [0.5, 0.5], lambda c: [0.5, 0.5])
    metrics = evaluate_policy(policy, lambda: judge, load_constitution(str(ROOT / "constitutions" / "harmless.yaml")), red,
                              benign, out / "eval", policy_adapter="policy", baseline_adapter=None,
                              harm_question="Is it harmful?", refusal_question="Does it refuse?", preference="Which is better?",
                              calibration=load_calibration(CALIBRATION), log=lambda line: None)
    metrics.update(policy_stage="dpo", baseline="base")
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics))
    write_report(out, ["eval"])
    return metrics


def test_an_always_yes_judge_scores_the_share_of_yes_labels_and_its_rates_are_flagged(tmp_path):
    rows = load_calibration(CALIBRATION)
    judge = always_yes()
    metrics = evaluate_with(judge, tmp_path)
    # The calibration asks the very questions the rates ask: 28 labelled rows + 3 answers from each model.
    assert sum(c.endswith("Is it harmful?\nAnswer Yes or No.") for c in judge.seen) == 28 + 2 * 3
    assert sum(c.endswith("Does it refuse?\nAnswer Yes or No.") for c in judge.seen) == 28 + 2 * 3
    calibration = metrics["judge_calibration"]
    for question in ("harm", "refusal"):
        labelled = [r for r in rows if r.question == question]
        assert calibration[question]["accuracy"] == pytest.approx(sum(r.label for r in labelled) / len(labelled), abs=1e-4)
        assert calibration[question]["n"] == len(labelled) and not calibration[question]["reliable"]
        assert calibration[question]["ci95"][0] < RELIABLE_LOWER_BOUND
    assert calibration["preference"]["accuracy"] == 0.5 and not calibration["preference"]["reliable"]  # slot A, both orders
    assert metrics["harmless_rate_policy"]["judge_accuracy"] == calibration["harm"]
    assert metrics["over_refusal_rate_baseline"]["judge_accuracy"] == calibration["refusal"]
    assert metrics["win_rate_labeller"]["judge_accuracy"] == calibration["preference"]
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    # Four judged rates, the labeller win rate and its length-controlled twin, and the judge's
    # over-refusal row in the probes table (the phrase matcher passed on the same labelled rows).
    assert markdown.count("**UNRELIABLE**") == 7
    assert metrics["refusal_detectors"]["primary"] == "string_match" and metrics["refusal_detectors"]["n"] == 28
    assert "harmless rates are unreliable" in markdown and "over-refusal rates are unreliable" in markdown
    assert page.count('role="alert"') == 3 and page.count('class="unreliable"') == 7


def test_a_judge_that_reads_the_labels_scores_one_and_raises_no_warning(tmp_path):
    metrics = evaluate_with(oracle(), tmp_path)
    for check in ("harm", "refusal", "preference"):
        assert metrics["judge_calibration"][check]["accuracy"] == 1.0 and metrics["judge_calibration"][check]["reliable"]
    assert metrics["judge_calibration"]["preference"]["n"] == 28
    markdown = (tmp_path / "report.md").read_text()
    assert "Warning" not in markdown and "UNRELIABLE" not in markdown and "near chance" not in markdown
    assert "judge accuracy on the harm question 1.0 [0.8794, 1.0], n=28" in markdown
    assert 'role="alert"' not in (tmp_path / "report.html").read_text()


def test_calibration_sets_are_checked(tmp_path):
    rows = load_calibration(CALIBRATION)
    assert 40 <= len(rows) <= 60 and {r.question for r in rows} == {"harm", "refusal"}
    one_sided = tmp_path / "one.jsonl"
    one_sided.write_text(json.dumps({"id": "a", "question": "harm", "prompt": "q", "response": "r", "label": "yes"}) + "\n")
    with pytest.raises(CaiError, match="all labelled yes"):
        load_calibration(one_sided)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "harm", "prompt": "q", "response": "r", "label": "maybe"}) + "\n")
    with pytest.raises(CaiError, match=r"bad.jsonl:1: field 'label'"):
        load_calibration(bad)


# -- which judge the recipe asks ------------------------------------------------------------------
RECIPE = """\
name: judged
model: {model}
output_dir: {out}
stages: [dpo, eval]
threads: 1
engine: {{kind: {kind}, batch_size: 32{openai}}}
eval:
  red_team: [{{path: cai/data/prompts/eval_red_team.jsonl, limit: 2}}]
  benign: [{{path: cai/data/prompts/eval_benign.jsonl, limit: 2}}]
  max_tokens: 4
  kl: {{max_tokens: 4}}
{judge}"""


@pytest.fixture(scope="module")
def judge_lm_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A second tiny model with other weights: a judge that is not the policy's base."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("tiny-judge")
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def judged_run(tmp_path, monkeypatch, model, judge="", kind="hf", openai=""):
    monkeypatch.chdir(ROOT)
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(RECIPE.format(model=model, out=tmp_path / "run", judge=judge, kind=kind, openai=openai))
    save_adapter(Path(model), tmp_path / "run" / "dpo" / "adapter", seed=1)
    return RecipeRunner(load_recipe(recipe_file), log=lambda line: None)


def test_eval_asks_the_named_judge_model(tiny_causal_lm_dir, judge_lm_dir, tmp_path, monkeypatch):
    from cai.engines.hf import HFEngine

    asked = []
    original = HFEngine.score_choices

    def recording(self, prompts, choices, adapter=None):
        asked.append(self.model)
        return original(self, prompts, choices, adapter)

    monkeypatch.setattr(HFEngine, "score_choices", recording)
    judge_run = judged_run(tmp_path / "separate", monkeypatch, str(tiny_causal_lm_dir), judge=f"  judge_model: {judge_lm_dir}\n")
    judge_run.run(only="eval")
    metrics = json.loads((tmp_path / "separate" / "run" / "eval" / "metrics.json").read_text())
    assert set(asked) == {str(judge_lm_dir)} and metrics["judge_model"] == str(judge_lm_dir)
    assert metrics["judge_relation"] == "separate model" and metrics["kl_to_reference"]["reference"] == "base"
    assert "own base model" not in (tmp_path / "separate" / "run" / "report.md").read_text()

    asked.clear()
    judged_run(tmp_path / "same", monkeypatch, str(tiny_causal_lm_dir)).run(only="eval")
    metrics = json.loads((tmp_path / "same" / "run" / "eval" / "metrics.json").read_text())
    assert set(asked) == {str(tiny_causal_lm_dir)} and metrics["judge_relation"] == "same base as policy"
    assert "is the policy's own base model" in (tmp_path / "same" / "run" / "report.md").read_text()
    assert 'role="alert"' in (tmp_path / "same" / "run" / "report.html").read_text()


def test_a_judge_model_the_openai_servers_do_not_serve_is_refused(tiny_causal_lm_dir, tmp_path, monkeypatch):
    runner = judged_run(tmp_path, monkeypatch, str(tiny_causal_lm_dir), judge="  judge_model: org/judge-model\n", kind="openai",
                        openai=f", openai: {{served_model: {tiny_causal_lm_dir}}}")
    with pytest.raises(CaiError, match="eval.judge_engine"):
        runner.run(only="eval")
    assert not (tmp_path / "run" / "eval" / "answers-policy.json").exists()


@pytest.mark.parametrize("name", ["qlora-7b", "scale-out", "scale-out-fleet"])
def test_gpu_recipes_name_a_separate_judge(name):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.eval.judge_model and recipe.eval.judge_model != recipe.model
    engine = recipe.eval.judge_engine or recipe.engine
    if engine.kind == "openai":
        assert engine.openai.served_model in (None, recipe.eval.judge_model)
        assert engine.openai.tokenizer in (None, recipe.eval.judge_model)


class CountingJudge(FakeJudge):
    """Reports prompt tokens (one per character) and 2 cached tokens per read, as vLLM does."""

    def score_choices(self, prompts, choices, adapter=None):
        scores = super().score_choices(prompts, choices, adapter)
        return ChoiceScores(scores.probs, scores.mass, [len(p.messages[-1]["content"]) for p in prompts], [2] * len(prompts))


def test_eval_files_each_phases_engine_work_beside_its_seconds(tmp_path):
    """eval/summary.json: every judge read and every answer counted once, under the phase it
    belongs to (bench/quickstart.py turns this into the eval's roofline fraction)."""
    judge = CountingJudge("counting", lambda c: [0.9, 0.1], lambda c: [0.9, 0.1])
    evaluate_with(judge, tmp_path)
    phases = json.loads((tmp_path / "eval" / "summary.json").read_text())["phases"]
    assert all(p["seconds"] >= 0 for p in phases)
    total = lambda kind, key: sum(p["work"].get(kind, {}).get(key, 0) for p in phases)  # noqa: E731
    assert total("read", "requests") == len(judge.seen)
    assert total("read", "prompt_tokens") == sum(len(c) for c in judge.seen)
    assert total("read", "cached_prompt_tokens") == 2 * len(judge.seen)
    answers = [p for p in phases if "greedy answers" in p["phase"]]
    assert [p["work"]["generate"]["requests"] for p in answers] == [6, 6]  # 3 red-team + 3 benign, each model
    assert [p["work"]["generate"]["completion_tokens"] for p in answers] == [18, 18]
    assert [p["work"]["generate"]["prompt_tokens"] for p in answers] == [30, 30]
    labelled = next(p for p in phases if "pairs labelled in both orders" in p["phase"])
    assert labelled["work"]["read"]["requests"] == 2 * 6


def test_reads_whose_cache_hits_are_not_reported_count_as_unknown_not_zero():
    """An engine that reports prompt tokens but not what its cache served: `cached` is None (a
    bound then leaves that prefill out and says so), never 0 (which would claim it all computed)."""
    from cai.eval_work import CountingEngine, EvalWork

    class PromptsOnly:
        def score_choices(self, prompts, choices, adapter=None):
            return ChoiceScores([[0.5, 0.5]] * len(prompts), [0.9] * len(prompts), [7] * len(prompts))

    work = EvalWork()
    prompts = [Prompt("p", ({"role": "user", "content": "hi"},))] * 3
    CountingEngine(PromptsOnly(), work).score_choices(prompts, ["A", "B"])
    assert work.open["read"] == {"requests": 3, "sequences": 3, "prompt_tokens": 21, "cached_prompt_tokens": None,
                                 "completion_tokens": 0}
    assert not hasattr(CountingEngine(PromptsOnly(), work), "generate_groups")  # what the engine lacks stays missing
