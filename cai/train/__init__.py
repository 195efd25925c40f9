"""Everything that trains a model, one module per trainer or job:

- `policy`: SFT on revisions and (soft-label) DPO, LoRA/QLoRA, through TRL; `dpo_soft` is the
  soft-label DPO loss TRL lacks.
- `reward`: the reward model (soft Bradley-Terry loss, source weights).
- `ppo` (+ `ppo_math`): cai's own PPO loop (TRL 1.16 has no PPOTrainer).
- `online`: GRPO and RLOO through TRL, and best-of-N.
- `kto`: KTO (Ethayarajh et al., 2024) on AI labels: each preference pair gives a desirable and
  an undesirable example, TRL's KTOTrainer trains on them.
- `online_dpo` (+ `online_dpo_trainer`): online DPO with cai's judge (online AI feedback, Guo et
  al., 2024): the policy samples two answers per prompt, cai's constitution-based labeller (or the
  reward model) says which is better with what probability, and a soft-label DPO step follows.
- `tracking`: progress bars and experiment trackers for every trainer.
- `distributed` and `launch`: training stages launched on several processes by `cai run`.

Settings classes import nothing heavy (recipes load them); the trainers import TRL and
transformers only when they train.
"""
