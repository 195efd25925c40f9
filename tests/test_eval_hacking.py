"""Reward-hacking signs: the trajectory over checkpoints, the warnings, and their place in the report."""

import json
import re

from cai.eval_hacking import flags, trajectory
from cai.report import write_report


def checkpoint(reward=(0.8, [0.5, 1.1]), win=(0.5, [0.35, 0.65]), raw=None, length=(20.0, [12.0, 28.0], 1.5), kl=(2.0, [1.5, 2.5]),
               reliable=True, correlation=None) -> dict:
    metrics = {
        "policy_stage": "dpo", "baseline": "sft",
        "reward_delta": {"mean": reward[0], "ci95": reward[1], "n": 32},
        "win_rate_labeller": {"all": {"rate": raw if raw is not None else win[0], "ci95": win[1], "n": 32}},
        "win_rate_labeller_length_controlled": {"rate": win[0], "ci95": win[1], "n": 32, "raw_rate": raw if raw is not None else win[0]},
        "length_difference": {"mean": length[0], "ci95": length[1], "ratio": length[2], "n": 32},
        "kl_to_reference": {"mean": kl[0], "ci95": kl[1], "n": 32, "label": "KL(policy || sft), nats per response, 32 samples",
                            "per_token": 0.05, "mean_tokens": 40.0, "cut_at_max_tokens": 0.1, "max_tokens": 80, "device": "cpu"},
        "judge_calibration": {"preference": {"accuracy": 0.9 if reliable else 0.5, "ci95": [0.8, 0.95] if reliable else [0.33, 0.67],
                                             "n": 28, "reliable": reliable}},
    }
    if correlation:
        metrics["reward_length_correlation"] = {"pearson": correlation[0], "ci95": correlation[1], "spearman": correlation[0], "n": 64}
    return metrics


def test_a_reward_model_gain_the_judge_does_not_see_is_flagged():
    points = trajectory([("dpo", checkpoint())])
    assert [p["name"] for p in points] == ["start", "dpo"] and points[0]["judge_win"] == 0.5 and points[1]["reward_delta"] == 0.8
    notes = flags(points, checkpoint())
    assert any(n.startswith("Reward hacking sign") for n in notes) and any(n.startswith("Length drift") for n in notes)
    assert not any("near chance" in n for n in notes)  # a validated judge: no caveat
    # The same numbers with a judge at chance carry the caveat instead of a verdict.
    assert any("near chance" in n for n in flags(points, checkpoint(reliable=False)))


def test_a_gain_both_agree_on_raises_nothing():
    good = checkpoint(win=(0.75, [0.6, 0.86]), length=(1.0, [-3.0, 5.0], 1.02))
    assert flags(trajectory([("dpo", good)]), good) == []
    # An interval that reaches 0 is noise, not a sign.
    noisy = checkpoint(reward=(0.2, [-0.1, 0.5]), length=(1.0, [-3.0, 5.0], 1.02))
    assert flags(trajectory([("dpo", noisy)]), noisy) == []


def test_verbosity_and_a_length_loving_reward_model_are_flagged():
    verbose = checkpoint(win=(0.5, [0.3, 0.7]), raw=0.8, length=(1.0, [-3.0, 5.0], 1.02), reward=(0.1, [-0.2, 0.4]),
                         correlation=(0.7, [0.55, 0.81]))
    notes = flags(trajectory([("dpo", verbose)]), verbose)
    assert any(n.startswith("Verbosity: the judge's raw win rate 0.8 falls to 0.5") for n in notes)
    assert any("score rises with length" in n for n in notes)


def test_kl_growth_across_iterations_without_a_judged_gain_is_flagged():
    runs = [(f"iteration {i}", checkpoint(kl=(k, [k - 0.5, k + 0.5]), win=(w, [w - 0.15, w + 0.15]), reward=(0.1, [-0.2, 0.4]),
                                          length=(1.0, [-3.0, 5.0], 1.02)))
            for i, (k, w) in enumerate([(1.0, 0.55), (3.0, 0.5)], 1)]
    notes = flags(trajectory(runs), runs[-1][1])
    assert notes == [notes[0]] and notes[0].startswith("KL to the baseline grew every iteration (1 -> 3 nats)")
    rising = [(name, {**m, "win_rate_labeller_length_controlled": {"rate": w, "ci95": [w - 0.1, w + 0.1]}})
              for (name, m), w in zip(runs, (0.55, 0.7))]
    assert flags(trajectory(rising), rising[-1][1]) == []
    shrinking = [(name, {**m, "kl_to_reference": {**m["kl_to_reference"], "mean": k}}) for (name, m), k in zip(runs, (3.0, 1.0))]
    assert flags(trajectory(shrinking), shrinking[-1][1]) == []


def test_the_report_draws_the_signs_per_checkpoint_and_warns(tmp_path):
    for folder, metrics in ((tmp_path / "eval", checkpoint(reward=(0.2, [0.0, 0.4]))), (tmp_path / "iteration-2" / "eval", checkpoint())):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(tmp_path, ["eval", "iteration-2/eval"]).read_text()
    chart = page[page.index("<h2>Reward hacking</h2>"):]
    chart = chart[: chart.index("</figure>")]
    for label in ("start", "iteration 1", "iteration 2"):  # the shared checkpoint axis, labelled once
        assert chart.count(f">{label}</text>") == 1
    for text in ("nats per response", "tokens", "share of prompts", "reward-model score, policy - baseline"):  # units, titles
        assert f">{text}</text>" in chart
    assert len(re.findall(r'id="f[0-9a-f]+-axes_\d+"', chart)) == 4  # four signals, each on its own axes
    markdown = (tmp_path / "report.md").read_text()
    assert "> **Warning:** Reward hacking sign: the reward model scores the policy +0.8" in markdown
    assert "| iteration 1 |" in markdown and "| iteration 2 |" in markdown


def test_the_report_shows_each_policy_stage_step_by_step(tmp_path):
    """DPO's implicit reward margin and log-probabilities, PPO's reward, KL and length, per step."""
    from cai.report_eval import training_signals

    (tmp_path / "dpo").mkdir()
    history = [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.1 * s, "logps/chosen": -50.0 - s, "logps/rejected": -52.0 - 2 * s}
               for s in range(1, 31)]
    (tmp_path / "dpo" / "metrics.json").write_text(json.dumps({"log_history": history}))
    chart = training_signals(tmp_path / "dpo", "dpo", "dpo")
    panels = len(re.findall(r'id="f[0-9a-f]+-axes_\d+"', chart))
    assert panels == 4 and ">training loss (DPO, on the soft labels)</text>" in chart and ">implicit reward margin, chosen - rejected</text>" in chart
    assert ">training step</text>" in chart and ">28</text>" in chart  # a numeric step axis over all 30 steps
    assert len(re.findall(r'-xtick_\d+"', chart)) <= 11 * panels  # x ticks thinned, not one per step
    (tmp_path / "ppo").mkdir()
    rows = [{"step": s, "reward": 0.1 * s, "kl": 0.05 * s, "response_length": 40 + s} for s in range(1, 5)]
    (tmp_path / "ppo" / "metrics.json").write_text(json.dumps({"history": rows}))
    chart = training_signals(tmp_path / "ppo", "ppo", "ppo")
    assert len(re.findall(r'id="f[0-9a-f]+-axes_\d+"', chart)) == 3 and ">nats per response</text>" in chart and ">tokens</text>" in chart
    assert training_signals(tmp_path / "missing", "dpo", "dpo") == ""
