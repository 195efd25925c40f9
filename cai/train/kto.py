"""KTO on AI labels (Ethayarajh et al., 2024): desirable and undesirable answers, no pairs needed.

    cai kto --data runs/blend --sft runs/sft --out runs/kto

KTO learns from single answers marked desirable or undesirable, against a reference point (the
policy's KL to the reference on mismatched prompt/answer pairs of the batch) rather than from
comparisons. cai's labels are comparisons, so each pair is *unpaired*: the chosen answer becomes
a desirable example and the rejected one an undesirable example, shuffled (seeded) so a batch
mixes prompts. TRL's KTOTrainer does the rest; as in DPO the reference is the policy with its
adapter disabled (the SFT model when the SFT adapter is merged into a full-precision base) and
the saved `adapter` applies to the plain base.

Low-confidence pairs (`chosen_prob` below `min_chosen_prob`): the labeller could barely tell the
answers apart, so calling one desirable and the other undesirable is close to a coin flip.
- `low_confidence: drop` (default) leaves the pair out: both answers, since neither has a label.
- `low_confidence: keep` trains them as hard labels anyway; the KTO paper reports KTO tolerates
  noisy and intransitive feedback better than DPO, and this mode lets one test that on AI labels.
Pairs whose answers are the same text carry no signal and are left out. When one answer to a
prompt is labelled desirable in one pair and undesirable in another (labelling with `pairing:
all`), its examples contradict each other and are left out too; exact repeats count once.

Balance: KTO weighs the desirable and undesirable losses by `desirable_weight` and
`undesirable_weight`; the paper recommends λ_D·n_D / (λ_U·n_U) in [1, 4/3]. Unpaired pairs give
n_D = n_U, so the default (`desirable_weight: null`) sets λ_D = λ_U·n_U/n_D, which is 1 for
balanced data and rebalances when contradictions or repeats removed more of one kind. Set a
number to override it. metrics.json records the counts and the weights used.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cai import runtime, trl_args
from cai.errors import CaiError
from cai.train.policy import TrainSettings, _train_and_save, load_policy, merged_adapter


@dataclass(frozen=True)
class KTOSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    beta: float = 0.1
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    min_chosen_prob: float = 0.6  # pairs labelled less confidently than this are "low confidence"
    low_confidence: Literal["drop", "keep"] = "drop"
    desirable_weight: float | None = None  # None: balanced, undesirable_weight x n_undesirable / n_desirable
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in ("kto", "apo_zero_unpaired"):
            raise CaiError(f"unknown loss type '{self.loss_type}' (kto or apo_zero_unpaired)", field="kto.loss_type")
        if self.low_confidence not in ("drop", "keep"):
            raise CaiError(f"unknown mode '{self.low_confidence}' (drop or keep)", field="kto.low_confidence")
        if not 0.5 <= self.min_chosen_prob <= 1:
            raise CaiError("must be in [0.5, 1]", field="kto.min_chosen_prob")
        if self.beta <= 0:
            raise CaiError("must be > 0", field="kto.beta")
        if (self.desirable_weight is not None and self.desirable_weight <= 0) or self.undesirable_weight <= 0:
            raise CaiError("weights must be > 0", field="kto.desirable_weight")
        # TRL estimates KTO's reference point from the *other* answers of a batch.
        if self.loss_type == "kto" and self.train.batch_size < 2:
            raise CaiError("KTO needs train.batch_size >= 2: its KL reference point pairs each prompt with another "
                           "answer of the same batch", field="kto.train.batch_size")


def kto_dataset(path: Path, settings: KTOSettings, seed: int = 0):
    """Preference records -> shuffled TRL unpaired rows (prompt, completion, label) and the counts
    of what was kept and left out (see the module docstring)."""
    import datasets

    from cai.data.importers import load_preferences

    records, _ = load_preferences(str(path))
    confident = [r for r in records if r["chosen_prob"] >= settings.min_chosen_prob]
    used = records if settings.low_confidence == "keep" else confident
    labels: dict[tuple[str, str], set[bool]] = {}
    messages: dict[tuple[str, str], tuple[list, list]] = {}
    identical = 0
    for record in used:
        chosen, rejected = record["chosen"], record["rejected"]
        if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
            identical += 1
            continue
        prompt_key = json.dumps(record["prompt"], sort_keys=True)
        for completion, desirable in ((chosen, True), (rejected, False)):
            key = (prompt_key, completion[-1]["content"])
            labels.setdefault(key, set()).add(desirable)
            messages[key] = (record["prompt"], completion)
    contradictory = [key for key, seen in labels.items() if len(seen) > 1]
    rows = [{"prompt": messages[key][0], "completion": messages[key][1], "label": next(iter(seen))}
            for key, seen in labels.items() if len(seen) == 1]
    random.Random(seed).shuffle(rows)  # mixed prompts per batch (the KL estimate); seeded, so a resume sees one order
    desirable = sum(r["label"] for r in rows)
    stats = {
        "pairs": len(records),
        "low_confidence_pairs": len(records) - len(confident),
        "dropped_low_confidence": len(records) - len(used),
        "identical_pairs": identical,
        "contradictory_answers": len(contradictory),
        "desirable": desirable,
        "undesirable": len(rows) - desirable,
        "mean_chosen_prob": sum(r["chosen_prob"] for r in used) / len(used) if used else None,
    }
    if not desirable or desirable == len(rows):
        raise CaiError(f"KTO needs desirable and undesirable examples; left {stats['desirable']} desirable and "
                       f"{stats['undesirable']} undesirable of {len(records)} pairs "
                       f"({stats['dropped_low_confidence']} dropped below min_chosen_prob {settings.min_chosen_prob})",
                       source=str(path))
    return datasets.Dataset.from_list(rows), stats


def balanced_weight(stats: dict, undesirable_weight: float) -> float:
    """λ_D with λ_D·n_D = λ_U·n_U, rounded up to 2 decimals (inside the paper's [1, 4/3] range
    as TRL checks it)."""
    return math.ceil(undesirable_weight * stats["undesirable"] / stats["desirable"] * 100) / 100


def train_kto(
    data: str | Path, model_name: str, out_dir: str | Path, settings: KTOSettings = KTOSettings(), *, sft_adapter: str | None = None
) -> dict:
    from trl import KTOTrainer

    out_dir = Path(out_dir)
    train = settings.train
    device = runtime.apply(runtime.RuntimeSettings(threads=train.threads), seed=train.seed)
    path = Path(data)
    dataset, stats = kto_dataset(path / "train.jsonl" if path.is_dir() else path, settings, seed=train.seed)
    desirable_weight = settings.desirable_weight or balanced_weight(stats, settings.undesirable_weight)
    model, tokenizer, lora = load_policy(model_name, train, device, adapter=sft_adapter)
    config = trl_args.build("kto", dict(
        beta=settings.beta,
        loss_type=settings.loss_type,
        max_length=train.max_length,
        desirable_weight=desirable_weight,
        undesirable_weight=settings.undesirable_weight,
        **runtime.trainer_arguments(train, out_dir, device),
    ), train.trl)
    # ref_model=None with an adapter: TRL computes reference log-probs with the adapter disabled.
    trainer = KTOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    meta = {
        "stage": "kto", "base_model": model_name, "sft_adapter": sft_adapter, "examples": len(trainer.train_dataset),
        **stats, "desirable_weight": desirable_weight, "undesirable_weight": settings.undesirable_weight,
        "low_confidence": settings.low_confidence, "settings": asdict(settings),
    }
    return _train_and_save(trainer, tokenizer, out_dir, meta, device, stacked_on=merged_adapter(train, sft_adapter))
