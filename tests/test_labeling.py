import math

import pytest

from cai import chat, schema
from cai.constitution import loads_constitution
from cai.engines.base import ChoiceScores, Generation, SamplingSettings, choice_token_ids, normalise
from cai.engines.hf import HFEngine
from cai.errors import CaiError
from cai.labeling import (
    LabelRun,
    LabelSettings,
    Pair,
    agreement_with_humans,
    expected_rating,
    human_eval_pairs,
    pairs_from_responses,
)
from cai.prompt_sets import Prompt
from cai.prompts import PromptSet
from cai.sampling import SampleSettings, run_sampling
from cai.store import read_jsonl

CONSTITUTION = """\
name: judge
principles:
  - {id: harm, critique: Point out harm., revision: Remove the harm.}
preferences:
  - {id: less-harmful, text: "Which response is less harmful?"}
  - {id: more-helpful, text: "Which response is more helpful?"}
  - {id: more-honest, text: "Which response is more honest?"}
"""

PROMPT = ({"role": "user", "content": "How do I stay safe when cycling at night?"},)
PAIRS = [Pair(f"pair{i}", PROMPT, f"good answer {i}: wear lights", f"bad answer {i}: close your eyes") for i in range(6)]


@pytest.fixture
def constitution():
    return loads_constitution(CONSTITUTION, "judge.yaml")


def option_text(prompt, letter):
    content = prompt.messages[-1]["content"]
    start = content.index(f"({letter}) ") + 4
    return content[start:].split("\n")[0]


class SlotA:
    """A labeller that always prefers whatever is shown as (A)."""

    name, model = "slot-a", "slot-a"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        return [Generation(["I think (A) is better."], 10, [5], ["stop"]) for _ in prompts]

    def score_choices(self, prompts, choices, adapter=None):
        return ChoiceScores([[0.9, 0.1] for _ in prompts], [0.8] * len(prompts))


class KnowsBest(SlotA):
    """A labeller that prefers the answer containing "good", wherever it is shown."""

    name, model = "knows-best", "knows-best"

    def score_choices(self, prompts, choices, adapter=None):
        probs = [[0.9, 0.1] if "good" in option_text(p, "A") else [0.1, 0.9] for p in prompts]
        return ChoiceScores(probs, [0.8] * len(prompts))


def label(engine, constitution, tmp_path, pairs=PAIRS, **settings):
    run = LabelRun(engine, constitution, pairs, PromptSet(), tmp_path, LabelSettings(**settings), show_progress=False)
    return run, run.run(), list(read_jsonl(tmp_path / "preferences.jsonl"))


def test_slot_biased_labeller_averages_to_half_and_is_flagged(constitution, tmp_path):
    run, summary, _ = label(SlotA(), constitution, tmp_path, keep_ties=True)
    records = run.records()
    assert len(records) == len(PAIRS)
    for record in records:
        assert record["label"]["p_a"] == pytest.approx(0.5) and record["chosen_prob"] == pytest.approx(0.5)
        assert record["position_consistent"] is False
        assert record["order_probs"] == {"ab": [pytest.approx(0.9)], "ba": [pytest.approx(0.1)]}
    assert summary["position_bias_rate"] == 1.0


def test_ties_are_dropped_and_counted_unless_kept(constitution, tmp_path):
    """SlotA's two orders average to exactly 0.5: no preference, which must not become "a wins"."""
    _, summary, records = label(SlotA(), constitution, tmp_path / "default")
    assert records == []
    assert summary["ties"] == summary["dropped_ties"] == len(PAIRS) and summary["kept"] == 0
    assert summary["dropped_low_confidence"] == 0 and summary["zero_mass_labels"] == 0
    _, summary, records = label(SlotA(), constitution, tmp_path / "kept", keep_ties=True)
    assert len(records) == len(PAIRS) and all(r["chosen_prob"] == 0.5 for r in records)
    assert summary["ties"] == len(PAIRS) and summary["dropped_ties"] == 0


def test_without_swap_the_slot_bias_passes_straight_through(constitution, tmp_path):
    _, _, records = label(SlotA(), constitution, tmp_path, swap=False)
    assert all(r["chosen_prob"] == pytest.approx(0.9) and r["position_consistent"] is None for r in records)
    assert all(r["chosen"][0]["content"].startswith("good") for r in records)  # a is always shown first


def test_content_aware_labeller_picks_the_better_answer(constitution, tmp_path):
    swapped = [Pair(p.id, p.prompt, p.b, p.a) for p in PAIRS]  # the good answer listed second
    _, summary, records = label(KnowsBest(), constitution, tmp_path, pairs=swapped, principles_per_pair=3)
    for record in records:
        assert record["chosen"][0]["content"].startswith("good")
        assert record["chosen_prob"] == pytest.approx(0.9) and record["position_consistent"] is True
        assert sorted(record["principle_ids"]) == ["less-harmful", "more-helpful", "more-honest"]
        assert len(record["order_probs"]["ab"]) == 3
        schema.validate_record("preference", record, "record")
    assert summary["position_bias_rate"] == 0.0


class Scripted(SlotA):
    """Per order: (P(first-listed answer), mass on the two choices); mass 0 gives the engines' [0.5, 0.5]."""

    name, model = "scripted", "scripted"

    def __init__(self, script):
        self.script = script  # pair number -> {"good_first": (p, mass), "bad_first": (p, mass)}

    def score_choices(self, prompts, choices, adapter=None):
        probs, mass = [], []
        for prompt in prompts:
            first = option_text(prompt, "A")
            number = int(first.split(" answer ")[1].split(":")[0])
            p, m = self.script(number)["good_first" if first.startswith("good") else "bad_first"]
            probs.append([0.5, 0.5] if m == 0 else [p, 1 - p])
            mass.append(m)
        return ChoiceScores(probs, mass)


def test_low_confidence_pairs_are_dropped_and_counted(constitution, tmp_path):
    mild = Scripted(lambda n: {"good_first": (0.55, 0.8), "bad_first": (0.45, 0.8)})
    _, summary, records = label(mild, constitution, tmp_path, min_confidence=0.6)
    assert records == [] and summary["dropped_low_confidence"] == len(PAIRS) and summary["dropped_ties"] == 0


def test_choice_mass_is_recorded_per_order(constitution, tmp_path):
    engine = Scripted(lambda n: {"good_first": (0.9, 0.8), "bad_first": (0.2, 0.25)})
    _, summary, records = label(engine, constitution, tmp_path)
    assert len(records) == len(PAIRS)
    for record in records:
        assert record["label"]["mass"] == {"ab": [0.8], "ba": [0.25]}  # a is the good answer, shown first in "ab"
        schema.validate_record("preference", record, "record")
    assert summary["zero_mass_reads"] == 0 and summary["zero_mass_labels"] == 0


def test_labels_without_choice_mass_are_dropped_and_counted(constitution, tmp_path):
    """Pair 0 never put probability on (A)/(B): the engines read that as [0.5, 0.5], a tie that
    min_confidence 0.5 would keep with "chosen" = answer a."""
    engine = Scripted(lambda n: {"good_first": (0.9, 0.0 if n == 0 else 0.7), "bad_first": (0.1, 0.0 if n == 0 else 0.7)})
    run, summary, records = label(engine, constitution, tmp_path, keep_ties=True)
    assert sorted(r["id"] for r in records) == [f"pair{i}" for i in range(1, 6)]
    assert summary["zero_mass_labels"] == 1 and summary["zero_mass_reads"] == 2 and summary["ties"] == 0
    empty = next(r for r in run.records() if r["id"] == "pair0")
    assert empty["label"]["mass"] == {"ab": [0.0], "ba": [0.0]} and empty["chosen_prob"] == 0.5


def test_labeller_that_never_answers_with_the_choices_stops_the_stage(constitution, tmp_path):
    mostly_silent = Scripted(lambda n: {"good_first": (0.9, 0.0 if n < 4 else 0.7), "bad_first": (0.1, 0.0 if n < 4 else 0.7)})
    with pytest.raises(CaiError, match=r"no probability on \(A\) and \(B\) in 8 of 12 reads"):
        label(mostly_silent, constitution, tmp_path / "silent")
    assert not (tmp_path / "silent" / "preferences.jsonl").exists()
    _, summary, _ = label(mostly_silent, constitution, tmp_path / "lenient", max_zero_mass_rate=0.7)
    assert summary["zero_mass_labels"] == 4 and summary["kept"] == 2


def test_cot_reads_after_reasoning_and_clamps(constitution, tmp_path):
    seen = []

    class Reasoner(KnowsBest):
        def score_choices(self, prompts, choices, adapter=None):
            seen.extend(prompts)
            return ChoiceScores([[0.99, 0.01] for _ in prompts], [0.9] * len(prompts))

    run, _, _ = label(Reasoner(), constitution, tmp_path, mode="cot")
    assert all(p.assistant_prefix.endswith("I think (A) is better.\nTherefore, the answer is: (") for p in seen)
    assert all(p.assistant_prefix.startswith("Let's think step by step:") for p in seen)
    for record in run.records():
        assert record["order_probs"] == {"ab": [0.6], "ba": [0.4]}  # each order clamped to [0.4, 0.6]
        assert 0.4 <= record["label"]["p_a"] <= 0.6


def test_changed_cot_clamp_is_refused_and_overwrite_relabels(constitution, tmp_path):
    class Sure(KnowsBest):
        def score_choices(self, prompts, choices, adapter=None):
            return ChoiceScores([[0.99, 0.01] if "good" in option_text(p, "A") else [0.01, 0.99] for p in prompts], [0.9] * len(prompts))

    _, _, records = label(Sure(), constitution, tmp_path, mode="cot")
    assert len(records) == len(PAIRS) and all(r["chosen_prob"] == pytest.approx(0.6) for r in records)
    with pytest.raises(CaiError, match="changed: .*cot_clamp"):
        label(Sure(), constitution, tmp_path, mode="cot", cot_clamp=(0.3, 0.7))
    run = LabelRun(Sure(), constitution, PAIRS, PromptSet(), tmp_path, LabelSettings(mode="cot", cot_clamp=(0.3, 0.7)),
                   overwrite=True, show_progress=False)
    run.run()
    assert all(r["chosen_prob"] == pytest.approx(0.7) for r in read_jsonl(tmp_path / "preferences.jsonl"))


def test_expected_rating():
    nine = [0.0] * 8 + [1.0]
    assert expected_rating(nine, 0.0) == pytest.approx((9 - 5.5) / 4.5)
    one = [1.0] + [0.0] * 8
    assert expected_rating(one, 1.0) == pytest.approx(1.0)  # "1" always continued as "10"
    assert expected_rating(one, 0.0) == pytest.approx(-1.0)
    uniform_over_ten = [0.2] + [0.1] * 8  # "1" carries both 1 and 10
    assert expected_rating(uniform_over_ten, 0.5) == pytest.approx(0.0)
    assert expected_rating([0.0] * 9 + [1.0], 0.0) == pytest.approx(1.0)  # "10" a token of its own
    assert expected_rating([0.1] * 10, 0.0) == pytest.approx(0.0)


def test_score_mode_rates_each_answer(constitution, tmp_path):
    class Rater(SlotA):
        def score_choices(self, prompts, choices, adapter=None):
            if choices == ["0"]:
                return ChoiceScores([[1.0]] * len(prompts), [0.0] * len(prompts))
            probs = []
            for p in prompts:
                rating = "9" if "good" in p.messages[-1]["content"].split("final response:")[1] else "1"
                probs.append([1.0 if c == rating else 0.0 for c in choices])
            return ChoiceScores(probs, [1.0] * len(prompts))

    _, summary, records = label(Rater(), constitution, tmp_path, mode="score")
    for record in records:
        assert record["chosen"][0]["content"].startswith("good")
        assert record["label"]["rating_a"] == pytest.approx(3.5 / 4.5) and record["label"]["rating_b"] == pytest.approx(-1.0)
        assert record["chosen_prob"] == pytest.approx(min(1.0, 0.5 + (3.5 / 4.5 + 1) / 4))
        assert record["position_consistent"] is None
    assert summary["position_bias_rate"] is None


def ten_token_tokenizer():
    """A byte-level BPE that, like GPT-2's or Llama 3's, spells 10 as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["Rating: [[10]] of 10, not [[1]]; 10 10 10"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    assert fast.convert_ids_to_tokens(fast("[[10]]")["input_ids"]) == ["[[", "10", "]]"]
    return fast


class TokenRater(SlotA):
    """A fake engine over a real tokenizer, read the way HFEngine reads choices. Its 'model' always
    writes its rating in the answer form the template pre-fills ("Rating: [[10]]"), in the
    tokenizer's own spelling: all probability on the next token of that spelling, none elsewhere.
    It rates an answer 10 if it contains "good", else `low`."""

    name, model = "token-rater", "token-rater"

    def __init__(self, tokenizer, low):
        self.tokenizer, self.low = tokenizer, low

    def score_choices(self, prompts, choices, adapter=None):
        render = lambda p, prefix: chat.render(self.tokenizer, p.messages, prefix)  # noqa: E731
        ids = choice_token_ids(self.tokenizer, render(prompts[0], prompts[0].assistant_prefix), choices)
        probs, mass = [], []
        for prompt in prompts:
            rating = 10 if "good" in prompt.messages[-1]["content"].split("final response:")[1] else self.low
            prefill = prompt.assistant_prefix.rstrip("0123456789")  # the template's, before any digits read so far
            reply = self.tokenizer(render(prompt, f"{prefill}{rating}]]"), add_special_tokens=False)["input_ids"]
            have = self.tokenizer(render(prompt, prompt.assistant_prefix), add_special_tokens=False)["input_ids"]
            following = reply[len(have)] if reply[: len(have)] == have and len(reply) > len(have) else None
            p, m = normalise([0.0 if token == following else -math.inf for token in ids])
            probs.append(p)
            mass.append(m)
        return ChoiceScores(probs, mass)


@pytest.mark.parametrize("spelling", ["digit_by_digit", "ten_is_a_token"])
@pytest.mark.parametrize("low", [1, 9])
def test_score_mode_reads_a_ten_as_ten(tiny_tokenizer_dir, constitution, tmp_path, spelling, low):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir) if spelling == "digit_by_digit" else ten_token_tokenizer()
    swapped = [Pair(p.id, p.prompt, p.b, p.a) for p in PAIRS[:2]]  # b, rated 10, is the better answer
    _, summary, records = label(TokenRater(tokenizer, low), constitution, tmp_path, pairs=swapped, mode="score")
    assert summary["kept"] == 2 and summary["zero_mass_reads"] == 0
    for record in records:
        assert record["label"]["rating_a"] == pytest.approx((low - 5.5) / 4.5)
        assert record["label"]["rating_b"] == pytest.approx(1.0)  # 10, not 1
        assert record["chosen"][0]["content"].startswith("good")
        assert record["chosen_prob"] == pytest.approx(min(1.0, 0.5 + (1.0 - (low - 5.5) / 4.5) / 4))


@pytest.mark.parametrize("mode", ["logprob", "cot", "score"])
def test_tiny_model_labels_are_probabilities(tiny_causal_lm_dir, constitution, tmp_path, mode):
    engine = HFEngine(str(tiny_causal_lm_dir), batch_size=8)
    # keep_ties: a random model's chain of thought often hits both clamp bounds, averaging to 0.5
    _, summary, records = label(engine, constitution, tmp_path, pairs=PAIRS[:3], mode=mode, cot_max_tokens=8, keep_ties=True)
    assert len(records) == 3 and summary["pairs"] == 3 and summary["zero_mass_labels"] == 0
    for record in records:
        assert 0.5 <= record["chosen_prob"] <= 1.0
        assert 0.0 <= record["label"]["p_a"] <= 1.0
        schema.validate_record("preference", record, "record")
        for probs in record.get("order_probs", {}).values():
            assert all(0.0 < p < 1.0 for p in probs)


def test_changed_mode_is_refused(constitution, tmp_path):
    label(SlotA(), constitution, tmp_path)
    with pytest.raises(CaiError, match="changed: .*mode"):
        label(SlotA(), constitution, tmp_path, mode="cot")


def test_agreement_with_humans():
    records, human_first = [], {}
    for i, (p_ab, p_ba, first) in enumerate([(0.9, 0.8, True), (0.9, 0.2, False), (0.3, 0.1, False), (0.7, 0.5, True)]):
        p_a = (p_ab + p_ba) / 2
        records.append({"id": str(i), "label": {"p_a": p_a}, "order_probs": {"ab": [p_ab], "ba": [p_ba]},
                        "chosen_prob": max(p_a, 1 - p_a), "position_consistent": (p_ab > 0.5) == (p_ba > 0.5) and p_ba != 0.5})
        human_first[str(i)] = first
    result = agreement_with_humans(records, human_first)
    # averaged p_a: 0.85 (agree), 0.55 (disagree), 0.2 (agree), 0.6 (agree)
    assert result["agreement_swap_averaged"] == 0.75
    # first order alone: 0.9 agree, 0.9 disagree, 0.3 agree, 0.7 agree
    assert result["agreement_single_order"] == 0.75
    assert result["position_bias_rate"] == 0.5


def test_human_eval_pairs_randomise_placement():
    records = [{"id": str(i), "prompt": list(PROMPT), "chosen": [{"role": "assistant", "content": f"good {i}"}],
                "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(200)]
    pairs, human_first = human_eval_pairs(records, seed=1)
    firsts = sum(human_first.values())
    assert 70 < firsts < 130
    for pair in pairs:
        assert pair.a.startswith("good") == human_first[pair.id]


def test_pairs_from_responses_skip_identical():
    rows = [{"prompt": list(PROMPT), "responses": ["x", "y", "z", "z"]}]
    assert [(p.a, p.b) for p in pairs_from_responses(rows)] == [("x", "y")]
    assert len(pairs_from_responses(rows, "all")) == 5


def test_sampling_k_distinct_and_resumable(tiny_causal_lm_dir, tmp_path):
    engine = HFEngine(str(tiny_causal_lm_dir), batch_size=8)
    prompts = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"question {i}"},)) for i in range(5)]
    settings = SampleSettings(k=3, sampling=SamplingSettings(temperature=1.0, max_tokens=10), chunk_size=2)
    summary = run_sampling(engine, prompts, tmp_path, settings, show_progress=False)
    rows = list(read_jsonl(tmp_path / "responses.jsonl"))
    assert summary["prompts"] == 5 and len(rows) == 5
    assert all(len(r["responses"]) == 3 and len(set(r["responses"])) == 3 for r in rows)
    first = (tmp_path / "responses.jsonl").read_text()
    (tmp_path / "work" / "samples.jsonl").write_text("".join((tmp_path / "work" / "samples.jsonl").read_text().splitlines(True)[:2]))
    run_sampling(engine, prompts, tmp_path, settings, show_progress=False)
    assert (tmp_path / "responses.jsonl").read_text() == first
