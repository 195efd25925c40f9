"""Training cost per step: reward model (LoRA, optionally QLoRA) on the builtin SmolLM2, on CPU.

    .venv/bin/python bench/train.py [--quantization none|4bit] [--steps 8] [--seq-len 256]

Builds a synthetic preference set whose chosen/rejected texts are about `--seq-len` tokens,
trains `--steps` optimizer steps, and reports seconds per step (first step excluded: warm-up)
and peak resident memory. On a GPU run it with a 7B-class model and --seq-len 1024 to check the
24 GB target; JSON results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from results_io import peak_memory, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import TrainerCallback

    from cai.train import reward
    from cai.lora import LoraSettings
    from cai.train.reward import RewardSettings

    words = " ".join(["word"] * args.seq_len)
    rows = [{"id": str(i), "prompt": [{"role": "user", "content": f"Question {i}"}],
             "chosen": [{"role": "assistant", "content": f"yes {words}"}], "rejected": [{"role": "assistant", "content": f"no {words}"}],
             "chosen_prob": 0.8, "source": "bench", "provenance": {"stage": "import"}} for i in range(args.steps * args.batch_size)]
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.started)

    original = reward._trainer_class

    def with_timer():
        trainer_class, collator = original()

        class Timed(trainer_class):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_callback(Timer())

        return Timed, collator

    reward._trainer_class = with_timer
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        settings = RewardSettings(lora=LoraSettings(r=16, alpha=32, quantization=args.quantization), batch_size=args.batch_size,
                                  max_steps=args.steps, max_length=args.seq_len + 64, save_steps=10_000)
        reward.train_reward_model(data, args.model, Path(tmp) / "rm", settings)
    steady = step_times[1:] or step_times
    result = {
        "task": "reward_model", "model": args.model, "quantization": args.quantization, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": len(step_times), "seconds_per_step": round(sum(steady) / len(steady), 3),
        "first_step_s": round(step_times[0], 3), **peak_memory(),
    }
    write_results(args.out or f"bench/results/train_rm_{args.quantization}.json", result)


if __name__ == "__main__":
    main()
