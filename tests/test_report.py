"""The HTML report renders in a real browser (headless Chromium) with its figures."""

import json
import shutil
import subprocess

import pytest

from cai.report import write_report


def fake_run(out):
    (out / "eval").mkdir(parents=True)
    interval = {"rate": 0.6, "ci95": [0.45, 0.73], "n": 40}
    metrics = {
        "policy_stage": "dpo", "baseline": "sft",
        "win_rate_labeller": {"all": interval, "red_team": interval, "benign": interval},
        "win_rate_reward_model": {"all": interval, "red_team": interval, "benign": interval},
        "harmless_rate_policy": interval, "harmless_rate_baseline": interval,
        "over_refusal_rate_policy": interval, "over_refusal_rate_baseline": interval,
        "mean_length": {"policy": 50.0, "baseline": 60.0}, "kl_to_reference": 1.5,
        "reward": {"policy": [0.1, 0.5, 0.9, 1.2], "baseline": [-0.2, 0.1, 0.3, 0.4]},
    }
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (out / "rm").mkdir()
    (out / "rm" / "metrics.json").write_text(json.dumps({"log_history": [{"loss": 0.7}, {"loss": 0.5}, {"loss": 0.4}]}))
    for stage in ("rm", "eval"):
        (out / stage / "done.json").write_text(json.dumps({"seconds": 12.5}))


def test_report_contents(tmp_path):
    fake_run(tmp_path)
    page = write_report(tmp_path, ["rm", "eval"]).read_text()
    assert page.count("<svg") == 4 and "win rate (reward model)" in page
    markdown = (tmp_path / "report.md").read_text()
    assert "| KL to the sft model (nats/response) | 1.5 |" in markdown and "| rm | 12.5 |" in markdown


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    fake_run(tmp_path)
    page = write_report(tmp_path, ["rm", "eval"])
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 4 and "Policy win rate against the baseline" in dom and "<polyline" in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
