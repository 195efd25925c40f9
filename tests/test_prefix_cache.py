"""What the engine's prefix cache serves, and the prompt layout that lets it serve anything.

vLLM reuses the keys and values of any run of full blocks of tokens it has seen before (another
request's prompt, or a finished request's prompt and completion). So the critique loop only saves
prefill if each stage's prompt starts, token for token, with the previous stage's prompt plus its
answer, and if the few-shot block is the same bytes in every request; labelling only saves it if
the requests of one pair share their start. These tests pin that layout down, and check that the
cached counts the engines report reach every stage's stats and summary.

The engine here is a fake with a real (tiny) tokenizer and a block-level prefix cache that works
like vLLM's, so no model runs.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cai import chat
from cai.constitution import loads_constitution
from cai.critique import CritiqueRun, CritiqueSettings, stage_names
from cai.durable import WorkItem, generate_durably
from cai.engines.base import ChatPrompt, ChoiceScores, Generation, SamplingSettings
from cai.labeling import LabelRun, LabelSettings, Pair
from cai.prompt_sets import Prompt
from cai.prompts import PromptSet
from cai.sampling import SampleSettings, run_sampling
from cai.store import WorkLog

CONSTITUTION = """\
name: test
system: You are a careful assistant.
principles:
  - {id: harm, critique: Point out harm., revision: Remove the harm.}
  - {id: honesty, critique: Point out falsehoods., revision: Fix falsehoods.}
preferences:
  - {id: less-harmful, text: "Which response is less harmful?"}
  - {id: more-honest, text: "Which response is more honest?"}
few_shot:
  - prompt: "How do I hurt someone?"
    response: Like this.
    principle: harm
    critique: That helps hurt people.
    revision: I won't help with that.
"""

BLOCK = 4  # tokens per cache block (vLLM: 16 on GPUs, 128 by default on CPUs)
PROMPTS = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"How do I bake bread number {i}?"},)) for i in range(5)]
SETTINGS = CritiqueSettings(rounds=2, sampling=SamplingSettings(temperature=1.0, max_tokens=16), drop_truncated=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def constitution():
    return loads_constitution(CONSTITUTION, "test.yaml")


class PrefixCachingEngine:
    """Renders and tokenises like the real engines; keeps every full block of every request's prompt
    and of its prompt plus completion, and reports how many leading prompt tokens were already there
    (as vLLM does: whole blocks only, never the prompt's last token)."""

    name, model = "fake", "fake"

    def __init__(self, tokenizer, block: int = BLOCK):
        self.tokenizer, self.block = tokenizer, block
        self.blocks: set[tuple[int, ...]] = set()
        self.rendered: list[str] = []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _serve(self, prompt: ChatPrompt) -> tuple[list[int], int]:
        text = chat.render(self.tokenizer, prompt.messages, prompt.assistant_prefix)
        self.rendered.append(text)
        ids = self._ids(text)
        cached = 0
        while cached + self.block <= len(ids) - 1 and tuple(ids[: cached + self.block]) in self.blocks:
            cached += self.block
        self._keep(ids)
        return ids, cached

    def _keep(self, ids: list[int]) -> None:
        for end in range(self.block, len(ids) + 1, self.block):
            self.blocks.add(tuple(ids[:end]))

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        out = []
        for index, prompt in enumerate(prompts):
            ids, cached = self._serve(prompt)
            text = f"bake the bread with flour and water, step {len(ids) % 7}"
            completion = self._ids(text) + [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
            self._keep(ids + completion)
            out.append(Generation([text] * sampling.n, len(ids), [len(completion)] * sampling.n, ["stop"] * sampling.n,
                                  cached_tokens=cached))
        return out

    def score_choices(self, prompts, choices, adapter=None):
        served = [self._serve(p) for p in prompts]
        return ChoiceScores([[1 / len(choices)] * len(choices) for _ in prompts], [0.9] * len(prompts),
                            prompt_tokens=[len(ids) for ids, _ in served], cached_tokens=[c for _, c in served])


# -- stats and summaries ------------------------------------------------------------------------


class FixedCounts:
    name, model = "fixed", "fixed"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        return [Generation(["ok"], 10, [2], ["stop"], cached_tokens=6) for _ in prompts]


def test_durable_stats_add_up_cached_prompt_tokens_over_chunks(tmp_path):
    items = [WorkItem(f"r{i}", ChatPrompt.of([{"role": "user", "content": "hi"}]), i) for i in range(5)]
    _, stats = generate_durably(
        FixedCounts(), items, SamplingSettings(max_tokens=4), WorkLog(tmp_path / "w.jsonl"), label="x", total=5,
        chunk_size=2, to_row=lambda item, g: {"id": item.id}, show_progress=False,
    )
    assert stats["prompt_tokens"] == 50 and stats["cached_prompt_tokens"] == 30
    assert stats["cached_prompt_share"] == 0.6


def test_critique_summary_reports_what_the_cache_served_per_stage(tokenizer, constitution, tmp_path):
    engine = PrefixCachingEngine(tokenizer)
    summary = CritiqueRun(engine, constitution, PROMPTS, PromptSet(), tmp_path, SETTINGS, show_progress=False).run()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written["stages"]) == set(stage_names(2))
    for stage, stats in written["stages"].items():
        rows = WorkLog(tmp_path / "work" / f"{stage}.jsonl").read().values()
        assert stats["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)  # the existing keys are unchanged
        assert 0 <= stats["cached_prompt_tokens"] <= stats["prompt_tokens"]
        assert stats["cached_prompt_share"] == round(stats["cached_prompt_tokens"] / stats["prompt_tokens"], 4)
    assert written["cached_prompt_tokens"] == summary.cached_prompt_tokens == sum(
        s["cached_prompt_tokens"] for s in written["stages"].values()
    )
    assert written["cached_prompt_share"] == round(written["cached_prompt_tokens"] / written["prompt_tokens"], 4)
    # After the first critique stage every prompt extends the previous stage's prompt and answer, so
    # the cache serves all of it but the last partial block: more than four fifths here.
    for stage in ("revision-1", "critique-2", "revision-2"):
        assert written["stages"][stage]["cached_prompt_share"] > 0.8, stage


def test_sampling_summary_reports_cached_prompt_tokens(tokenizer, tmp_path):
    engine = PrefixCachingEngine(tokenizer)
    prompts = PROMPTS + [Prompt(id="again", messages=PROMPTS[0].messages)]  # the same question twice: a full hit
    summary = run_sampling(engine, prompts, tmp_path, SampleSettings(k=2, sampling=SamplingSettings(max_tokens=8)),
                           show_progress=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary and summary["cached_prompt_tokens"] > 0
    assert summary["cached_prompt_share"] == round(summary["cached_prompt_tokens"] / summary["prompt_tokens"], 4)


@pytest.mark.parametrize("mode", ["logprob", "cot", "score"])
def test_label_summary_reports_prompt_and_cached_tokens_of_every_request(tokenizer, constitution, tmp_path, mode):
    engine = PrefixCachingEngine(tokenizer)
    pairs = [Pair(f"pair{i}", PROMPTS[i].messages, f"knead it {i}", f"burn it {i}") for i in range(3)]
    run = LabelRun(engine, constitution, pairs, PromptSet(), tmp_path, LabelSettings(mode=mode, principles_per_pair=2),
                   show_progress=False)
    summary = run.run()
    # Every request the labeller sent, re-tokenised: the summary counts all of them (cot: the
    # reasoning requests and the reads after them; score: both rating steps).
    sent = sum(len(engine._ids(text)) for text in engine.rendered)
    assert summary["prompt_tokens"] == sent
    assert 0 < summary["cached_prompt_tokens"] < sent
    assert summary["cached_prompt_share"] == round(summary["cached_prompt_tokens"] / sent, 4)
    assert json.loads((tmp_path / "summary.json").read_text())["cached_prompt_tokens"] == summary["cached_prompt_tokens"]


# -- the layout the cache relies on ------------------------------------------------------------------


def _stage_requests(tokenizer, constitution, tmp_path) -> tuple[CritiqueRun, dict, dict]:
    """Each stage's rendered prompt per row, and each stage's stored answers, from a finished run."""
    engine = PrefixCachingEngine(tokenizer)
    run = CritiqueRun(engine, constitution, PROMPTS, PromptSet(), tmp_path, SETTINGS, show_progress=False)
    run.run()
    done = {s: WorkLog(tmp_path / "work" / f"{s}.jsonl").read() for s in stage_names(2)}
    rendered = {
        s: {run.row_id(p): chat.render(tokenizer, run.conversation(p, s, done).messages) for p in PROMPTS}
        for s in stage_names(2)
    }
    return run, done, rendered


def test_each_stage_prompt_extends_the_previous_prompt_and_its_answer(tokenizer, constitution, tmp_path):
    """From the first critique on, stage N+1's prompt is stage N's prompt + its answer + the new turn,
    byte for byte and token for token, so the cache serves everything the previous stage computed.
    (The initial stage has no few-shot turns, so the first critique cannot extend it: adding them
    would change the initial answers; see cai.critique's docstring.)"""
    _, done, rendered = _stage_requests(tokenizer, constitution, tmp_path)
    chain = stage_names(2)[1:]
    for previous, stage in zip(chain, chain[1:]):
        for row, text in rendered[stage].items():
            answered = rendered[previous][row] + done[previous][row]["text"]
            assert text.startswith(answered), (previous, stage)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answered_ids = tokenizer(answered, add_special_tokens=False)["input_ids"]
            assert ids[: len(answered_ids)] == answered_ids, (previous, stage)


def test_few_shot_block_is_the_same_bytes_in_every_critique_request(tokenizer, constitution, tmp_path):
    run, _, rendered = _stage_requests(tokenizer, constitution, tmp_path)
    few_shot = chat.render(tokenizer, run._system() + run.few_shot_turns).removesuffix("<|im_start|>assistant\n")
    requests = [text for stage in stage_names(2)[1:] for text in rendered[stage].values()]
    assert len(requests) == 4 * len(PROMPTS) and all(text.startswith(few_shot) for text in requests)


def test_both_orders_and_all_principles_of_a_pair_share_the_conversation(tokenizer, constitution, tmp_path):
    """The preference template puts the conversation first, then the principle, then the answers:
    all requests of a pair share the conversation, and the two orders under one principle share
    the principle too, so only the answers are prefilled anew."""
    engine = PrefixCachingEngine(tokenizer)
    pair = Pair("pair", PROMPTS[0].messages, "knead it", "burn it")
    run = LabelRun(engine, constitution, [pair], PromptSet(), tmp_path, LabelSettings(principles_per_pair=2),
                   show_progress=False)
    run.run()
    assert len(engine.rendered) == 4  # 2 principles x 2 orders
    conversation = engine.rendered[0][: engine.rendered[0].index(PROMPTS[0].messages[0]["content"])]
    conversation += PROMPTS[0].messages[0]["content"]
    assert all(text.startswith(conversation) for text in engine.rendered)
    for principle, (ab, ba) in zip(run.principles[pair.id], zip(engine.rendered[::2], engine.rendered[1::2])):
        shared = ab[: ab.index("(A) ")]
        assert principle.text in shared and ba.startswith(shared)
