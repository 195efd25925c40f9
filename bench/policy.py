"""Per-step cost of the policy trainers on the builtin SmolLM2 (CPU) or any model (GPU).

    .venv/bin/python bench/policy.py --task sft|dpo|kto|online_dpo|ppo|grpo|rloo [--steps 6] [--quantization none|4bit]

Synthetic data of fixed size; reports mean seconds per optimizer step over the run (first step
included for the TRL trainers, which report only a total) and peak resident memory (and peak GPU
memory on CUDA). JSON results go to bench/results/policy_<task>_<quantization>.json.
KTO trains on the DPO task's pairs unpaired (batch-size single answers per step plus its KL pass);
online DPO samples 2 x 32-token answers per prompt and judges each pair with cai's labeller (the
same model on the transformers engine, both orders), and also reports the seconds of a step spent
sampling and judging.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from results_io import peak_memory, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["sft", "dpo", "kto", "online_dpo", "ppo", "grpo", "rloo"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    args = parser.parse_args()

    from cai.lora import LoraSettings
    from cai.train.policy import DPOSettings, TrainSettings, train_dpo, train_sft
    from cai.prompt_sets import Prompt

    lora = LoraSettings(r=16, alpha=32, quantization=args.quantization)
    train = TrainSettings(lora=lora, batch_size=args.batch_size, max_steps=args.steps, max_length=512, save_steps=10_000)
    answer = "Here is a careful and helpful answer. " * 6
    n = args.steps * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.task == "sft":
            rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]} for i in range(n)]
            (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            metrics = train_sft(tmp / "d.jsonl", args.model, tmp / "out", train)
            seconds = metrics["train_seconds"] / metrics["steps"]
        elif args.task in ("dpo", "kto"):
            rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": "No. " * 30}], "chosen_prob": 0.9, "source": "bench",
                     "provenance": {"stage": "import"}} for i in range(n)]
            (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if args.task == "dpo":
                metrics = train_dpo(tmp / "d.jsonl", args.model, tmp / "out", DPOSettings(train=train))
            else:
                from cai.train.kto import KTOSettings, train_kto

                metrics = train_kto(tmp / "d.jsonl", args.model, tmp / "out", KTOSettings(train=train))
            seconds = metrics["train_seconds"] / metrics["steps"]
        elif args.task == "online_dpo":
            from cai.constitution import load_constitution
            from cai.engines.hf import HFEngine
            from cai.train.online_dpo import ConstitutionJudge, OnlineDPOSettings, train_online_dpo

            prompts = [Prompt(id=str(i), messages=({"role": "user", "content": f"Question {i}?"},)) for i in range(n)]
            judge = ConstitutionJudge(HFEngine(args.model), load_constitution("constitutions/harmless.yaml"))
            metrics = train_online_dpo(prompts, args.model, judge, tmp / "out", OnlineDPOSettings(train=train, max_completion_length=32))
            seconds = metrics["train_seconds"] / metrics["steps"]
            history = metrics["log_history"]
            metrics["note"] = (f"per step: {args.batch_size} prompts x 2 answers of <= 32 tokens; "
                               f"sampling {sum(h['seconds/sample'] for h in history) / len(history):.2f} s, "
                               f"judging {sum(h['seconds/judge'] for h in history) / len(history):.2f} s")
        else:
            from cai.train.reward import RewardScorer
            from transformers import AutoModelForSequenceClassification

            from cai import models
            from cai.loading import load_tokenizer

            tokenizer = load_tokenizer(args.model, padding_side="right")
            rm = AutoModelForSequenceClassification.from_pretrained(models.resolve(args.model), num_labels=1)
            rm.config.pad_token_id = tokenizer.pad_token_id
            scorer = RewardScorer(rm, tokenizer)
            prompts = [Prompt(id=str(i), messages=({"role": "user", "content": f"Question {i}?"},)) for i in range(16)]
            if args.task == "ppo":
                from cai.train.ppo import PPOSettings, PPOTrainer

                settings = PPOSettings(steps=args.steps, batch_size=4, mini_batch_size=2, max_new_tokens=32, lora=lora, save_every=10_000)
                history = PPOTrainer(args.model, scorer.score, [list(p.messages) for p in prompts], tmp / "out", settings).train(log=None)
                steady = history[1:] or history
                seconds = sum(h["seconds"] for h in steady) / len(steady)
                metrics = {"steps": len(history), "note": "4 prompts x 32 new tokens per rollout, 2 PPO epochs"}
            else:
                from cai.train.online import OnlineSettings, train_online

                settings = OnlineSettings(train=train, num_generations=min(4, args.batch_size), max_completion_length=32)
                metrics = train_online(prompts, args.model, scorer, tmp / "out", settings, method=args.task)
                seconds = metrics["train_seconds"] / metrics["steps"]
    result = {"task": args.task, "model": args.model, "quantization": args.quantization, "batch_size": args.batch_size,
              "steps": metrics["steps"], "seconds_per_step": round(seconds, 3), **peak_memory(),
              **({"note": metrics["note"]} if "note" in metrics else {})}
    write_results(f"bench/results/policy_{args.task}_{args.quantization}.json", result)


if __name__ == "__main__":
    main()
