"""Policy trainers beyond SFT/DPO (which stay in `cai.policy` for now).

- `cai.train.kto`: KTO (Ethayarajh et al., 2024) on AI labels: each preference pair gives a
  desirable and an undesirable example, TRL's KTOTrainer trains on them.
- `cai.train.online_dpo`: online DPO with cai's judge (online AI feedback, Guo et al., 2024): the
  policy samples two answers per prompt, cai's constitution-based labeller (or the reward model)
  says which is better with what probability, and a soft-label DPO step follows.

Settings classes import nothing heavy (recipes load them); the trainers import TRL and
transformers only when they train.
"""
