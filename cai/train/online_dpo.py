"""Online DPO with cai's judge: RLAIF done online (online AI feedback, Guo et al., 2024).

    cai online-dpo --prompts prompts.jsonl --constitution constitutions/harmless.yaml --sft runs/sft --out runs/odpo
    cai online-dpo --prompts prompts.jsonl --reward runs/rm --out runs/odpo          # the reward model judges

Each step: the policy samples two answers to each prompt of the batch; the judge says with what
probability p the first is better; the soft-label DPO loss of `cai.train.dpo_soft` (conservative DPO
for sigmoid, IPO's soft target, the expected hinge) moves the policy toward the judge's
preference, as far as p says (p = 0.5: no push at all). The reference is the policy with its
adapter disabled (the SFT model when the SFT adapter is merged into a full-precision base, the
base for a quantised one). Checkpoints, resume, scheduler and optimiser are transformers'
Trainer's; its `trl:` pass-through takes any TrainingArguments field.

Judges:
- `labeller` (default): cai's constitution-based labeller (`cai.labeling.LabelRun`), on the
  feedback model: a preference principle drawn from the constitution per pair, P("(A)") vs
  P("(B)") read from the feedback model, both orders averaged (swap-debiased), several principles
  averaged with `labeller.principles_per_pair`; `labeller.mode: cot` or `score` work too. p is
  that label's `p_a`.
- `reward_model`: a trained cai reward model; p = sigmoid(r_first - r_second) (Bradley-Terry).
`labels: hard` trains on the judge's pick alone (p of 1 or 0, 0.5 on an exact tie), the
original online-AI-feedback recipe, for comparison.

Why not TRL's OnlineDPOTrainer (trl.experimental, 1.16): it takes no pairwise judge (TRL's judges
were removed in 1.1); it scores each completion alone with reward functions and calls the higher
one chosen, so the label is hard (first >= second) and a pairwise, swap-averaged comparison under
a principle has nowhere to go; and its loss is computed inline in `training_step`, so a soft
label would mean replacing its whole step. cai's loop (`cai.train.online_dpo_trainer`) is a
transformers Trainer whose loss step samples, judges and applies the soft loss.

Every judged pair is appended to `work/judged.jsonl` (step, prompt, both answers, p), so what the
policy was pushed toward can be read afterwards; a resumed run appends the steps it redoes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Sequence

from cai import runtime, store, trl_args
from cai.errors import CaiError
from cai.labeling import LabelSettings
from cai.train.policy import TrainSettings, _train_and_save, load_policy, merged_adapter


@dataclass(frozen=True)
class OnlineDPOSettings:
    """`train.batch_size` counts prompts: each gets two sampled answers, one judged pair. Setting
    only some of `train`'s keys keeps the others' defaults below (lr 5e-5)."""

    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=5e-5, batch_size=4))
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    labels: Literal["soft", "hard"] = "soft"  # soft: the judge's p in the loss; hard: its pick (p = 1 or 0)
    judge: Literal["labeller", "reward_model"] = "labeller"
    # The labeller's settings when judge is labeller (mode, principles_per_pair, swap, seed, cot_*);
    # its confidence filter, pairing and chunking are for the offline label stage and unused here.
    labeller: LabelSettings = field(default_factory=LabelSettings)
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise CaiError(f"unknown loss type '{self.loss_type}' (sigmoid, ipo or hinge)", field="online_dpo.loss_type")
        if self.labels not in ("soft", "hard"):
            raise CaiError(f"unknown mode '{self.labels}' (soft or hard)", field="online_dpo.labels")
        if self.judge not in ("labeller", "reward_model"):
            raise CaiError(f"unknown judge '{self.judge}' (labeller or reward_model)", field="online_dpo.judge")
        if self.beta <= 0:
            raise CaiError("must be > 0", field="online_dpo.beta")
        if self.max_completion_length < 1:
            raise CaiError("must be >= 1", field="online_dpo.max_completion_length")
        if self.temperature <= 0:
            raise CaiError("must be > 0: the two answers must be sampled, not greedy", field="online_dpo.temperature")
        if not 0 < self.top_p <= 1:
            raise CaiError("must be in (0, 1]", field="online_dpo.top_p")
        if self.max_completion_length >= self.train.max_length:
            raise CaiError(f"must be below train.max_length ({self.train.max_length}), which also holds the prompt",
                           field="online_dpo.max_completion_length")


class Judge(Protocol):
    """P(first answer is better) for each (conversation, first, second)."""

    name: str

    def __call__(self, prompts: Sequence[Sequence[dict]], first: Sequence[str], second: Sequence[str]) -> list[float]: ...


class ConstitutionJudge:
    """cai's labeller as an online judge: `LabelRun.judge` on the pairs of one step."""

    name = "labeller"

    def __init__(self, engine, constitution, settings: LabelSettings = LabelSettings(), templates=None):
        from cai.prompts import PromptSet

        self.engine = engine
        self.constitution = constitution
        self.settings = settings
        self.templates = templates or PromptSet()
        self.last: list[dict] = []  # the last call's label records (principles, per-order probabilities)

    def __call__(self, prompts, first, second) -> list[float]:
        from cai.labeling import LabelRun, Pair

        # The id draws the pair's principles: the same for either order of the two answers, so
        # judging (b, a) gives exactly 1 - p(a, b); the position keeps ids distinct within a call.
        pairs = [Pair(store.stable_id("online", index, list(prompt), sorted([a, b])), tuple(prompt), a, b)
                 for index, (prompt, a, b) in enumerate(zip(prompts, first, second))]
        run = LabelRun(self.engine, self.constitution, pairs, self.templates, Path("online_dpo"), self.settings,
                       show_progress=False)
        self.last = run.judge()
        return [record["label"]["p_a"] for record in self.last]


class RewardJudge:
    """A cai reward model as judge: p = sigmoid(r_first - r_second)."""

    name = "reward_model"

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, prompts, first, second) -> list[float]:
        conversations = [list(p) for p in prompts]
        scores = self.scorer.score(conversations * 2, list(first) + list(second))
        n = len(conversations)
        return [1 / (1 + math.exp(-(a - b))) for a, b in zip(scores[:n], scores[n:])]


def train_online_dpo(
    prompts: Sequence,
    model_name: str,
    judge: Judge,
    out_dir: str | Path,
    settings: OnlineDPOSettings = OnlineDPOSettings(),
    *,
    sft_adapter: str | None = None,
) -> dict:
    """`prompts`: `cai.prompt_sets.Prompt`s (or message lists). Writes `adapter/`, `metrics.json`
    and `work/judged.jsonl` under `out_dir`; returns the metrics."""
    import datasets

    from cai.train.online_dpo_trainer import OnlineDPOTrainer

    out_dir = Path(out_dir)
    train = settings.train
    if not prompts:
        raise CaiError("online DPO needs prompts", field="online_dpo.prompts")
    device = runtime.apply(runtime.RuntimeSettings(threads=train.threads), seed=train.seed)
    model, tokenizer, lora = load_policy(model_name, train, device, adapter=sft_adapter)
    rows = [{"prompt": [dict(m) for m in (p.messages if hasattr(p, "messages") else p)]} for p in prompts]
    config = trl_args.build("online_dpo", dict(remove_unused_columns=False, **runtime.trainer_arguments(train, out_dir, device)),
                            train.trl)
    trainer = OnlineDPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                               judge=judge, settings=settings, peft_config=lora, judged_log=out_dir / "work" / "judged.jsonl")
    meta = {"stage": "online_dpo", "base_model": model_name, "sft_adapter": sft_adapter, "prompts": len(rows),
            "judge": judge.name, "labels": settings.labels, "settings": asdict(settings)}
    metrics = _train_and_save(trainer, tokenizer, out_dir, meta, device, stacked_on=merged_adapter(train, sft_adapter))
    judged = [h["judge/p_first"] for h in metrics["log_history"] if "judge/p_first" in h]
    metrics["mean_judge_confidence"] = (sum(h["judge/confidence"] for h in metrics["log_history"] if "judge/confidence" in h)
                                        / len(judged)) if judged else None
    store.write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
