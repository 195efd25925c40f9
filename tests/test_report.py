"""The report says how far its numbers can be trusted, draws real charts (matplotlib: axes, ticks,
units, intervals), shows what the models said (answers side by side with the verdicts, critique
traces), writes each caption once, is byte-for-byte deterministic, and renders in a real browser
(headless Chromium) with its figures and warnings."""

import html
import json
import re
import shutil
import subprocess

import pytest

from cai.constitution import load_constitution
from cai.paths import shipped_dir
from cai.report import write_report

STAGES = ["critique", "label", "rm", "ppo", "eval"]
HOSTILE = "<script>alert('pwned')</script> Step one:\x00 & so on"


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_run(out, *, judge_relation="same base as policy", harm_accuracy=(0.54, [0.36, 0.71])):
    (out / "eval").mkdir(parents=True)
    interval = {"rate": 0.6, "ci95": [0.45, 0.73], "n": 40}
    harm = {"accuracy": harm_accuracy[0], "ci95": harm_accuracy[1], "n": 28, "reliable": harm_accuracy[1][0] >= 0.6}
    refusal = {"accuracy": 0.93, "ci95": [0.77, 0.98], "n": 28, "reliable": True}
    preference = {"accuracy": 0.89, "ci95": [0.73, 0.96], "n": 28, "reliable": True}
    metrics = {
        "policy_stage": "ppo", "baseline": "sft", "judge_model": "smollm2-135m-instruct", "judge_relation": judge_relation,
        "reward_model_relation": "optimised against by ppo",
        "judge_calibration": {"rows": 56, "reliable_lower_bound": 0.6, "harm": harm, "refusal": refusal, "preference": preference},
        "win_rate_labeller": {"all": interval, "red_team": interval, "benign": interval, "judge_accuracy": preference},
        "win_rate_reward_model": {"all": interval, "red_team": interval, "benign": interval},
        "harmless_rate_policy": {**interval, "judge_accuracy": harm}, "harmless_rate_baseline": {**interval, "judge_accuracy": harm},
        "over_refusal_rate_policy": {**interval, "judge_accuracy": refusal},
        "over_refusal_rate_baseline": {**interval, "judge_accuracy": refusal},
        "mean_length": {"policy": 50.0, "baseline": 60.0},
        "kl_to_reference": {"mean": 1.5, "ci95": [1.1, 1.9], "n": 32, "sd": 1.2, "per_token": 0.031, "mean_tokens": 48.4,
                            "cut_at_max_tokens": 0.25, "label": "KL(policy || sft), nats per response, 32 samples",
                            "reference": "sft", "max_tokens": 80, "device": "cpu"},
        "reward": {"policy": [0.1 * i for i in range(12)], "baseline": [0.05 * i - 0.2 for i in range(12)]},
    }
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics))
    # 6 red-team and 6 benign held-out prompts; the last of each kind gets identical answers.
    responses = []
    for kind, prefix in (("red_team", "ert"), ("benign", "ebn")):
        for i in range(6):
            baseline = f"baseline answer {prefix}-{i}"
            policy = baseline if i == 5 else (HOSTILE if (kind, i) == ("red_team", 0) else f"policy answer {prefix}-{i}")
            responses.append({"id": f"{prefix}-{i}", "kind": kind, "prompt": [{"role": "user", "content": f"question {prefix}-{i}?"}],
                              "policy": policy, "baseline": baseline, "labeller_p_policy": 0.7 if i % 2 == 0 else 0.3,
                              "judge_p_yes": {"policy": 0.9 if i == 0 else 0.1, "baseline": 0.2}})
    _jsonl(out / "eval" / "responses.jsonl", responses)
    for model, base in (("policy", 40), ("baseline", 55)):
        generations = [{"texts": ["..."], "completion_tokens": [base + 3 * i], "finish_reasons": ["length" if i < 3 else "stop"]}
                       for i in range(12)]
        (out / "eval" / f"answers-{model}.json").write_text(json.dumps({"key": "k", "generations": generations}))
    (out / "rm").mkdir()
    (out / "rm" / "metrics.json").write_text(json.dumps({"log_history": [
        {"step": s, "loss": 0.7 - 0.1 * s, "accuracy": 0.5 + 0.1 * s} for s in (1, 2, 3)]}))
    (out / "ppo").mkdir()
    (out / "ppo" / "metrics.json").write_text(json.dumps({"history": [
        {"step": s, "reward": 0.2 * s, "kl": 3.0 * s, "policy_loss": -0.01 * s, "value_loss": 0.5 / s, "response_length": 40 + s}
        for s in range(1, 9)]}))
    constitution = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    principles = [p.id for p in constitution.principles]
    traces = [{"id": f"t{i}", "prompt_id": f"rt-{i:03d}", "category": "violence",
               "prompt": [{"role": "user", "content": f"critique prompt {i}"}], "initial": f"initial answer {i}",
               "rounds": [{"round": r, "principle_id": principles[(i + r) % len(principles)], "critique": f"critique {i}.{r}",
                           "revision": f"revision {i}.{r}", "flags": []} for r in (1, 2)],
               "final_round": None if i == 1 else 2, "flags": [],
               "provenance": {"constitution": "harmless", "constitution_hash": constitution.hash}} for i in range(5)]
    _jsonl(out / "critique" / "trace.jsonl", traces)
    labels = [{"id": f"p{i}", "chosen_prob": 0.5 + 0.04 * i, "position_consistent": i % 3 == 0,
               "order_probs": {"ab": [0.9, 0.8], "ba": [0.2, 0.3 + 0.05 * i]}} for i in range(9)]
    _jsonl(out / "label" / "preferences.jsonl", labels)
    for stage in ("rm", "eval"):
        (out / stage / "done.json").write_text(json.dumps({"seconds": 12.5}))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One synthetic run and its report, shared by the tests that only read it: (folder, page)."""
    out = tmp_path_factory.mktemp("run")
    fake_run(out)
    return out, write_report(out, STAGES).read_text(encoding="utf-8")


def figures(page: str) -> dict[str, str]:
    """Caption (without its note) -> the whole <figure>."""
    found = {}
    for figure in re.findall(r"<figure>.*?</figure>", page, flags=re.S):
        caption = re.search(r"<figcaption[^>]*>(.*?)(?: <span|</figcaption>)", figure, flags=re.S).group(1)
        found[html.unescape(caption)] = figure
    return found


def panel_segments(svg: str) -> list[str]:
    """The SVG split at each axes group: one segment per panel."""
    return re.split(r'<g id="f[0-9a-f]+-axes_\d+">', svg)[1:]


CAPTIONS = ["Policy win rate against the baseline, with 95% intervals", "Harmless and over-refusal rates, baseline and policy",
            "Answer lengths on the held-out prompts, baseline and policy",
            "Reward-model scores of the baseline's and the policy's answers",
            "Reward-hacking signs: ppo, checkpoint by checkpoint", "Label confidence: the AI labeller's chosen_prob per pair",
            "Position consistency of the AI labels", "Training: rm, step by step", "Training: ppo, step by step"]


def test_report_contents(built):
    folder, page = built
    assert list(figures(page)) == CAPTIONS and page.count("<svg") == len(CAPTIONS)
    assert "win rate (reward model)" in page and "<h2>Reward hacking</h2>" in page
    markdown = (folder / "report.md").read_text()
    assert r"| KL(policy \|\| sft), nats per response, 32 samples | 1.5 | [1.1, 1.9] |" in markdown and "| rm | 12.5 |" in markdown
    # Every judged rate carries the judge's accuracy on the question it was asked.
    assert ("| harmless_rate_policy | 0.6 | [0.45, 0.73] | **UNRELIABLE** judge: same base as policy; judge accuracy on the "
            "harm question 0.54 [0.36, 0.71], n=28: near chance |") in markdown
    assert "| over_refusal_rate_policy | 0.6 | [0.45, 0.73] | judge: same base as policy; judge accuracy on the refusal question 0.93" in markdown
    assert "judge accuracy on the labelled pairs 0.89 [0.73, 0.96], n=28 |" in markdown
    assert "in-distribution: reward model optimised against by ppo" in markdown
    assert "Figures, the two models' answers side by side and the critique traces are in report.html." in markdown


def test_report_warns_where_the_evaluation_is_in_distribution_or_at_chance(built, tmp_path):
    folder, page = built
    markdown = (folder / "report.md").read_text()
    warnings = [line for line in markdown.splitlines() if line.startswith("> **Warning:**")]
    assert len(warnings) == 3 and page.count('<div class="warning" role="alert">') == 3
    assert "is the policy's own base model" in warnings[0] and "optimised against by ppo" in warnings[1]
    assert "the harmless rates are unreliable" in warnings[2] and page.count('class="unreliable"') == 2

    separate = tmp_path / "separate"
    separate.mkdir()
    fake_run(separate, judge_relation="separate model", harm_accuracy=(0.89, [0.73, 0.96]))
    page = write_report(separate, STAGES).read_text()
    warnings = [line for line in (separate / "report.md").read_text().splitlines() if line.startswith("> **Warning:**")]
    assert len(warnings) == 1 and "reward model optimised against by ppo" in warnings[0]
    assert "UNRELIABLE" not in page and "own base model" not in page and "near chance" not in page


def test_every_figure_has_axes_ticks_and_units(built):
    charts = figures(built[1])
    for caption, figure in charts.items():
        assert "xtick_" in figure and "ytick_" in figure, caption  # matplotlib's tick groups
        assert "<dc:date>" not in figure and "<script" not in figure, caption
    wins = charts["Policy win rate against the baseline, with 95% intervals"]
    for tick in ("0.00", "0.50", "1.00", "reward model, all prompts", "AI labeller, benign",
                 "policy win rate against the baseline (share of prompts; ties count half)"):
        assert f">{tick}</text>" in wins
    assert "0.60 [0.45, 0.73], n=40" in wins  # the interval is drawn and written
    rates = charts["Harmless and over-refusal rates, baseline and policy"]
    assert ">share of prompts</text>" in rates and ">read by the judge</text>" in rates and ">accuracy 0.54, near chance</text>" in rates
    assert ">baseline</text>" in rates and ">policy</text>" in rates  # the legend
    lengths = charts["Answer lengths on the held-out prompts, baseline and policy"]
    assert ">answer length (tokens, greedy decoding)</text>" in lengths and html.escape("25% of the policy's answers cut") in lengths
    confidence = charts["Label confidence: the AI labeller's chosen_prob per pair"]
    assert ">0.5</text>" in confidence and ">1.0</text>" in confidence and "Dashed: the mean (0.660 over 9 pairs)." in confidence
    consistency = charts["Position consistency of the AI labels"]
    assert len(panel_segments(consistency)) == 2 and ">consistent</text>" in consistency and "3 of 9 checked pairs consistent (33%)" in consistency
    hacking = charts["Reward-hacking signs: ppo, checkpoint by checkpoint"]
    assert ">start</text>" in hacking and ">ppo</text>" in hacking and ">nats per response</text>" in hacking
    rm = charts["Training: rm, step by step"]
    assert ">nats per pair</text>" in rm and ">training step</text>" in rm and ">share of pairs</text>" in rm


def test_ppo_reward_and_kl_are_drawn_on_separate_axes(built):
    ppo = figures(built[1])["Training: ppo, step by step"]
    panels = panel_segments(ppo)
    reward = [i for i, p in enumerate(panels) if ">reward-model score of the sampled answers</text>" in p]
    kl = [i for i, p in enumerate(panels) if ">KL to the reference</text>" in p]
    assert len(panels) == 5 and len(reward) == len(kl) == 1 and reward != kl
    assert ">reward</text>" in panels[reward[0]] and ">nats per response</text>" in panels[kl[0]]
    # Each has its own scale: reward reaches 1.6, KL 24; each panel's ticks are its own.
    assert all("ytick_" in p for p in panels) and ">24</text>" in panels[kl[0]] and ">1.6</text>" in panels[reward[0]]
    assert ">24</text>" not in panels[reward[0]]


def test_answers_side_by_side_with_the_verdicts_escaped(built):
    page = built[1]
    section = page[page.index("<h2>Answers side by side</h2>"):page.index("<h2>Reward hacking</h2>")]
    cards = section.split('<article class="pair">')[1:]
    # 4 red-team + 4 benign, spread through the prompts whose answers differ: 0, 1, 3, 4 of each kind.
    assert [re.search(r"<code>([^<]+)</code>", c).group(1) for c in cards] == [
        "ert-0", "ert-1", "ert-3", "ert-4", "ebn-0", "ebn-1", "ebn-3", "ebn-4"]
    first = cards[0]
    shown = html.escape(HOSTILE.replace("\x00", "\ufffd"))  # escaped, and no control character written
    assert "<script>" not in page and "\x00" not in page and shown in first and "baseline answer ert-0" in first
    assert first.index("baseline answer ert-0") < first.index(shown)  # baseline left, policy right
    assert "judge: <strong>harmful</strong> (P(yes) = 0.90)" in first and "judge: <strong>not harmful</strong> (P(yes) = 0.20)" in first
    assert "AI labeller, both orders: prefers <strong>the policy</strong> (P(policy better) = 0.700)" in first
    assert "prefers <strong>the baseline</strong>" in cards[1] and "judge: <strong>does not refuse</strong>" in cards[4]
    # The harm judge is near chance: its verdicts say so; the validated refusal judge's do not.
    assert "(reader near chance)" in first.split("phrase matcher")[0] and "(reader near chance)" not in cards[4].split("phrase matcher")[0]
    assert "reward model: 0.000" in first and "phrase matcher: <strong>no refusal</strong>" in first
    assert "2 of 12 answer pairs are identical" in section and "accuracy 0.54 [0.36, 0.71] on 28 labelled checks" in section


def test_critique_traces_show_principle_critique_and_revision(built):
    page = built[1]
    section = page[page.index("<h2>Critique and revision traces</h2>"):page.index("<h2>AI preference labels</h2>")]
    traces = section.split('<article class="trace">')[1:]
    constitution = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    # Spread through the four traces whose revision was kept (trace 1 kept none): 0, 3, 4.
    assert len(traces) == 3 and ["rt-000" in traces[0], "rt-003" in traces[1], "rt-004" in traces[2]] == [True] * 3
    for i, trace in zip((0, 3, 4), traces):
        for text in (f"critique prompt {i}", f"initial answer {i}", f"critique {i}.1", f"revision {i}.2"):
            assert text in trace
        principle = constitution.principles[(i + 1) % len(constitution.principles)]
        assert f"principle <code>{principle.id}</code>" in trace and html.escape(principle.critique) in trace
        assert trace.count("kept for SFT") == 1


def test_each_caption_and_heading_appears_once(built):
    page = built[1]
    captions = [html.escape(c) for c in figures(page)]
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert len(captions) == len(CAPTIONS) and len(headings) >= 8
    for text in captions + headings:
        assert page.count(text) == 1, text


def test_the_report_is_byte_for_byte_deterministic(built):
    folder, page = built
    assert write_report(folder, STAGES).read_bytes() == page.encode()  # built a second time
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several inline SVGs, no id shared between them


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(built, tmp_path):
    page = built[0] / "report.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == len(CAPTIONS) and "Policy win rate against the baseline" in dom and "xtick_" in dom
    assert dom.count('role="alert"') == 3 and dom.count('class="unreliable"') == 2
    assert dom.count('<article class="pair">') == 8 and dom.count('<article class="trace">') == 3
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
