"""The `trl:` pass-through: any TRL config field from a recipe, checked against the class at load."""

import pytest

from cai.errors import CaiError
from cai.recipe import load_recipe
from test_policy import small, write_pairs, write_sft

RECIPE = """\
name: r
stages: [sft, dpo]
sft:
  settings:
    max_steps: 2
    trl:
      lr_scheduler_type: constant
dpo:
  settings:
    beta: 0.2
    train:
      trl:
        {key}: {value}
"""


def recipe(tmp_path, key="weight_decay", value="0.01", extra=""):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(key=key, value=value) + extra)
    return path


def test_trl_keys_reach_the_stage_settings_and_top_level_keys_spread(tmp_path):
    loaded = load_recipe(recipe(tmp_path, extra="trl:\n  max_grad_norm: 0.5\n  packing: true\n  weight_decay: 0.3\n"))
    assert loaded.sft.settings.trl == {"max_grad_norm": 0.5, "packing": True, "weight_decay": 0.3,
                                       "lr_scheduler_type": "constant"}
    # DPOConfig has no `packing`; the stage's own weight_decay wins over the top level's.
    assert loaded.dpo.settings.train.trl == {"max_grad_norm": 0.5, "weight_decay": 0.01}
    overridden = load_recipe(recipe(tmp_path), ["dpo.settings.train.trl.lr_scheduler_type=cosine", "trl.logging_steps=5"])
    assert overridden.dpo.settings.train.trl == {"logging_steps": 5, "weight_decay": 0.01, "lr_scheduler_type": "cosine"}


@pytest.mark.parametrize("key, value, message", [
    ("warmup_ratioo", "0.1", r"unknown DPOConfig field 'warmup_ratioo'"),
    ("learning_rate", "0.001", r"'learning_rate' is cai's own setting for dpo \(set dpo.settings.train.learning_rate instead\)"),
    ("beta", "0.5", r"set dpo.settings.beta instead"),
    ("output_dir", "/tmp/elsewhere", r"cai sets it itself"),
    ("lr_scheduler_type", "cosinee", r"DPOConfig refuses it: .*cosinee is not a valid SchedulerType"),
])
def test_bad_trl_key_names_file_line_and_key(tmp_path, key, value, message):
    path = recipe(tmp_path, key, value)
    with pytest.raises(CaiError, match=message) as error:
        load_recipe(path)
    assert f"{path}:13" in str(error.value) and f"dpo.settings.train.trl.{key}" in str(error.value)


def test_top_level_key_no_stage_takes_is_refused(tmp_path):
    with pytest.raises(CaiError, match=r"recipe.yaml:15.*field 'trl.packingg'.*no training stage of this recipe takes it"):
        load_recipe(recipe(tmp_path, extra="trl:\n  packingg: true\n"))


def test_cli_refuses_a_bad_trl_key_before_any_work(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "cai.cli", "run", str(recipe(tmp_path)), f"output_dir={out}",
                             "sft.settings.trl.warmup_ratioo=0.1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "field 'sft.settings.trl.warmup_ratioo'" in result.stderr and not out.exists()


def test_trl_keys_change_training(tiny_causal_lm_dir, tmp_path):
    """The keys reach the trainer: a constant schedule keeps the logged learning rate where the
    default linear one decays it, and weight decay changes the trained adapter."""
    from cai.train.policy import DPOSettings, train_dpo, train_sft

    data = write_sft(tmp_path / "sft.jsonl")
    linear = train_sft(data, str(tiny_causal_lm_dir), tmp_path / "linear", small(max_steps=4))["log_history"]
    constant = train_sft(data, str(tiny_causal_lm_dir), tmp_path / "constant",
                         small(max_steps=4, trl={"lr_scheduler_type": "constant"}))["log_history"]
    assert [h["learning_rate"] for h in constant] == pytest.approx([1e-2] * 4)
    assert linear[-1]["learning_rate"] < 0.5e-2
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    plain = train_dpo(pairs, str(tiny_causal_lm_dir), tmp_path / "dpo", DPOSettings(train=small(max_steps=2)))
    clipped = train_dpo(pairs, str(tiny_causal_lm_dir), tmp_path / "dpo-clip",
                        DPOSettings(train=small(max_steps=2, trl={"max_grad_norm": 1e-4})))
    assert plain["log_history"][0]["loss"] == pytest.approx(clipped["log_history"][0]["loss"])  # same start
    assert plain["log_history"][1]["loss"] != pytest.approx(clipped["log_history"][1]["loss"], abs=1e-6)


def test_trainer_refuses_a_bad_key_given_in_code(tiny_causal_lm_dir, tmp_path):
    from cai.train.policy import train_sft

    with pytest.raises(CaiError, match=r"field 'trl.num_train_epochs'.*set sft.settings.epochs instead"):
        train_sft(write_sft(tmp_path / "sft.jsonl"), str(tiny_causal_lm_dir), tmp_path / "o",
                  small(trl={"num_train_epochs": 3}))
