"""The measurement tools of issue 22: bench/roofline.py's bounds on a hand-made machine, and
bench/quickstart.py's reading of a run folder. Nothing is measured and no engine starts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # appended: bench's module names never shadow anything

import quickstart  # noqa: E402
import roofline  # noqa: E402
from results_io import with_roofline  # noqa: E402

BANDWIDTH = 50e9


def machine_roof() -> dict:
    """100 M parameters (90 M in matmuls, 10 M of them the LM head), 1000 KV values a token."""
    return {
        "model": {"params": 100e6, "matmul_params": 90e6, "lm_head_params": 10e6, "kv_values_per_token": 1000,
                  "flops_per_token": 180e6, "attention_flops_per_context_token": 1000},
        "measured": {"gemm_fp32_flops": {"1": 50e9, "64": 100e9, "square_2048": 120e9},
                     "gemm_bf16_flops": {"1": 90e9, "64": 400e9}, "read_bytes_per_s": BANDWIDTH},
    }


def test_decode_at_batch_one_is_bandwidth_bound():
    step_bytes = (100e6 + 1 * 100 * 1000) * 4  # fp32 weights once + one sequence's KV cache at context 100
    assert roofline.limited_by(machine_roof(), 1, 100) == "bandwidth"
    assert roofline.decode_bound(machine_roof(), 1, 100) == pytest.approx(BANDWIDTH / step_bytes)
    # bf16 halves the bytes; the step is still the memory's (2 ms of compute against 4 ms of reads)
    assert roofline.decode_bound(machine_roof(), 1, 100, "bfloat16") == pytest.approx(BANDWIDTH / (step_bytes / 2))


def test_decode_at_a_huge_batch_is_compute_bound():
    roof = machine_roof()
    assert roofline.limited_by(roof, 10_000, 0) == "compute"
    assert roofline.decode_bound(roof, 10_000, 0) == pytest.approx(100e9 / 180e6)  # rate at the largest batch / FLOPs
    assert roofline.decode_bound(roof, 10_000, 500) == pytest.approx(100e9 / (180e6 + 1000 * 500))


def test_gemm_rate_interpolates_in_log_batch():
    roof = machine_roof()
    assert roofline.gemm_rate(roof, 8) == pytest.approx(75e9)  # log 8 is half-way from log 1 to log 64
    assert roofline.gemm_rate(roof, 1) == 50e9 and roofline.gemm_rate(roof, 4096) == 100e9
    assert roofline.peak_rate(roof) == 120e9  # the square product counts for the peak, not per batch


def test_prefill_bound_uses_the_peak_rate_at_half_the_prompt_without_the_lm_head():
    """Logits only at a sequence's last position: the LM head's 2 x 10 M FLOPs are not a prompt
    token's cost, unless prompt log-probabilities are read."""
    assert roofline.prefill_bound(machine_roof(), context=200) == pytest.approx(120e9 / (160e6 + 1000 * 100))
    assert roofline.prefill_bound(machine_roof(), context=200, lm_head=True) == pytest.approx(120e9 / (180e6 + 1000 * 100))


def test_generation_fraction_is_bound_time_over_measured_time():
    roof = machine_roof()
    prefill_seconds = 1000 * (160e6 + 1000 * 50) / 120e9  # 1000 prompt tokens of 100 at the peak rate, no LM head
    decode_seconds = 500 * (100e6 + 150_000) * 4 / BANDWIDTH  # 500 single-sequence steps at context 150
    fraction = roofline.generation_fraction(roof, 1000, 500, seconds=10.0, batch=1, context=150, prefill_context=100)
    assert fraction == pytest.approx((prefill_seconds + decode_seconds) / 10.0)
    assert 0 < fraction <= 1


def test_training_fraction_counts_forward_and_activation_backward():
    roof = machine_roof()
    assert roofline.training_fraction(roof, tokens=1000, seconds=10.0) == pytest.approx(1000 * 4 * 90e6 / 120e9 / 10.0)
    assert roofline.train_flops_per_token(roof, reference_forward=True) == pytest.approx(6 * 90e6)  # DPO's reference
    assert roofline.train_flops_per_token(roof, lm_head=False) == pytest.approx(4 * 80e6)  # reward model: no LM head
    # attention over a 200-token sequence: a token sees 100 on average; forward + backward = 3 x forward
    assert roofline.train_flops_per_token(roof, seq_len=200) == pytest.approx(4 * 90e6 + 3 * 1000 * 100)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_model_costs_match_a_real_llama(tied, bias):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                  intermediate_size=80, vocab_size=100, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(LlamaConfig(**config))
    costs = roofline.model_costs(config)
    assert costs["params"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert costs["matmul_params"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert costs["kv_values_per_token"] == 2 * 3 * 2 * 8


# --- bench/quickstart.py ----------------------------------------------------------------------

def write_done(folder: Path, seconds: float, summary: dict, engine_start: float | None) -> None:
    folder.mkdir(parents=True)
    done = {"fingerprint": "f", "seconds": seconds, "summary": summary}
    if engine_start is not None:
        done["engine_start_seconds"] = engine_start
    (folder / "done.json").write_text(json.dumps(done))


def fake_run(root: Path, critique_seconds: float = 100.0) -> Path:
    run = root / "run"
    write_done(run / "eval", 50.0, {"prompts": {"red_team": 4}}, engine_start=10.0)  # written first, listed last
    phases = {"initial": {"rows": 4, "generated": 4, "prompt_tokens": 200, "cached_prompt_tokens": 0, "completion_tokens": 400},
              "critique-1": {"rows": 4, "generated": 4, "prompt_tokens": 1000, "cached_prompt_tokens": 600, "completion_tokens": 200}}
    write_done(run / "critique", critique_seconds, {"prompt_tokens": 1200, "cached_prompt_tokens": 600, "completion_tokens": 600,
                                                    "seconds": 40.0}, engine_start=20.0)
    (run / "critique" / "summary.json").write_text(json.dumps({"stages": phases}))
    write_done(run / "sample", 30.0, {"prompts": 4, "k": 2, "generated": 4, "prompt_tokens": 400, "completion_tokens": 800,
                                      "seconds": 29.0}, engine_start=None)  # a done.json from before the field
    write_done(run / "sft", 60.0, {"rows": 8, "steps": 2, "train_seconds": 55.0}, engine_start=0.0)
    (run / "sft" / "metrics.json").write_text(json.dumps({"log_history": [{"step": 1, "num_tokens": 500.0, "epoch": 0.5},
                                                                          {"step": 2, "num_tokens": 1000.0, "epoch": 1.0}]}))
    return run


def test_quickstart_reads_each_stage_of_a_run(tmp_path):
    roof = machine_roof()
    result = quickstart.read_run(fake_run(tmp_path), roof, "unused")
    stages = result["stages"]
    assert list(stages) == ["critique", "sft", "sample", "eval"]  # pipeline order, not file order

    critique = stages["critique"]
    assert critique["work_seconds"] == 80.0 and critique["fraction_of"] == "work_seconds"
    assert critique["computed_prompt_tokens"] == 600 and critique["prefill_counted"]
    bound = (roofline.generation_bound_seconds(roof, 200, 400, batch=4, context=50 + 50, prefill_context=50)
             + roofline.generation_bound_seconds(roof, 400, 200, batch=4, context=250 + 25, prefill_context=250))
    assert critique["roofline_fraction"] == pytest.approx(bound / 80.0, abs=1e-4)
    assert critique["generate_fraction"] == pytest.approx(bound / 40.0, abs=1e-4)

    sample = stages["sample"]  # no engine_start_seconds: unknown, not zero; no cached count: prefill left out
    assert sample["engine_start_seconds"] is None and sample["work_seconds"] is None
    assert not sample["prefill_counted"] and sample["phases"]["sample"]["batch"] == 8  # 4 prompts x k = 2
    expected = 800 / roofline.decode_bound(roof, 8, 100 + 800 / 8 / 2) / 30.0
    assert sample["roofline_fraction"] == pytest.approx(expected, abs=1e-4)

    sft = stages["sft"]
    assert sft["train_tokens"] == 1000 and sft["mean_seq_len"] == 125.0 and sft["fraction_of"] == "train_seconds"
    cost = roofline.train_flops_per_token(roof, seq_len=125)
    assert sft["roofline_fraction"] == pytest.approx(roofline.training_fraction(roof, 1000, 55.0, cost), abs=1e-4)

    assert stages["eval"]["seconds"] == 50.0 and stages["eval"]["roofline_fraction"] is None
    assert result["sum_of_stages_seconds"] == 240.0
    assert result["engine_start_seconds_total"] == 30.0 and result["engine_start_unknown_stages"] == ["sample"]
    assert result["sum_excluding_engine_starts_seconds"] == 210.0


def test_labels_are_kept_side_by_side(tmp_path):
    roof, out = machine_roof(), tmp_path / "quickstart.json"
    quickstart.store_label(out, "before", quickstart.read_run(fake_run(tmp_path / "a"), roof, "unused"))
    runs = quickstart.store_label(out, "after", quickstart.read_run(fake_run(tmp_path / "b", critique_seconds=90.0), roof, "unused"))
    assert set(json.loads(out.read_text())["runs"]) == {"before", "after"} == set(runs)
    table = quickstart.markdown_table(runs)
    assert "| stage | before s | after s | roofline fraction (after) |" in table
    after = runs["after"]["stages"]["critique"]["roofline_fraction"]
    assert f"| critique | 100.0 | 90.0 | {after:.3f} |" in table and not math.isclose(after, runs["before"]["stages"]["critique"]["roofline_fraction"])


def test_output_dir_is_cleared_only_when_it_is_a_run_under_the_temp_dir(tmp_path, monkeypatch):
    # Every folder here lives under tmp_path, so a broken guard can only delete test folders.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(quickstart.tempfile, "gettempdir", lambda: str(temp))
    outside = fake_run(tmp_path / "elsewhere")  # a real cai run, but not under the temp dir
    with pytest.raises(SystemExit, match="refusing"):
        quickstart.clear_output_dir(outside)
    assert (outside / "critique" / "done.json").exists()
    stranger = temp / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="refusing"):
        quickstart.clear_output_dir(stranger)
    assert (stranger / "todo.txt").exists()
    run = fake_run(temp)
    quickstart.clear_output_dir(run)
    assert not run.exists()


def test_with_roofline_attaches_fractions():
    results = with_roofline({"seconds": 3.0, "roofline_fraction": {"loop": 0.5}}, raw=0.123456, label=None)
    assert results == {"seconds": 3.0, "roofline_fraction": {"loop": 0.5, "raw": 0.1235, "label": None}}


def _write_run(root: Path, revision: str, sample: str, chosen_prob: float, swap: bool) -> Path:
    (root / "critique").mkdir(parents=True)
    (root / "sample").mkdir()
    (root / "label").mkdir()
    trace = {"id": "r1", "initial": "first", "rounds": [{"round": 1, "critique": "c", "revision": revision}]}
    (root / "critique" / "trace.jsonl").write_text(json.dumps(trace) + "\n")
    # sampled rows' ids differ between run folders (they hash the adapter path): matched by prompt id
    (root / "sample" / "responses.jsonl").write_text(json.dumps({"id": str(root), "prompt_id": "p1", "responses": [sample, "b"]}) + "\n")
    good, bad = [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]
    pair = {"id": str(root), "prompt": "q", "chosen": bad if swap else good, "rejected": good if swap else bad,
            "chosen_prob": 1 - chosen_prob if swap else chosen_prob}
    (root / "label" / "preferences.jsonl").write_text(json.dumps(pair) + "\n")
    return root


def test_compare_runs_counts_identical_rows_and_the_largest_label_gap(tmp_path):
    import compare_runs

    a = _write_run(tmp_path / "a", "the same revision", "sampled text", 0.70, swap=False)
    b = _write_run(tmp_path / "b", "the same revisions", "sampled text", 0.65, swap=True)
    result = compare_runs.compare(a, b)
    assert result["critique"]["initial"]["identical"] == 1
    assert result["critique"]["revision-1"] == {"rows": 1, "identical": 0, "identical_share": 0.0, "first_split_chars": [17]}
    assert result["sample"]["identical"] == 2
    assert result["label"]["same_pairs"] == 1  # the same two answers, stored in the other order
    assert result["label"]["max_abs_chosen_prob_difference"] == pytest.approx(0.05)


def test_eval_stage_bound_adds_each_phases_work_by_kind(tmp_path):
    """Judge reads: prefill of the tokens the cache did not serve, no LM head; the KL reference's
    prompt log-probabilities: prefill with the LM head on every token; KL samples: decode only
    (their cache hits are unknown), flagged; fractions per phase and for the stage."""
    roof = machine_roof()
    work = {"read": {"requests": 10, "sequences": 10, "prompt_tokens": 2000, "cached_prompt_tokens": 500, "completion_tokens": 0},
            "prompt_logprobs": {"requests": 4, "sequences": 4, "prompt_tokens": 800, "cached_prompt_tokens": 0, "completion_tokens": 0},
            "sample": {"requests": 4, "sequences": 4, "prompt_tokens": 400, "cached_prompt_tokens": None, "completion_tokens": 200}}
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"phases": [{"phase": "judge", "seconds": 10.0, "work": work},
                                                                {"phase": "probes", "seconds": 1.0, "work": {}}]}))
    reads = 1500 * (160e6 + 1000 * 100) / 120e9  # mean prompt 200 tokens: a token sees 100 on average
    logprobs = 800 * (180e6 + 1000 * 100) / 120e9
    samples = 200 / roofline.decode_bound(roof, 4, 100 + 200 / 4 / 2)
    result = quickstart.eval_stage(roof, folder)
    assert result["bound_seconds"] == pytest.approx(reads + logprobs + samples)
    assert result["prefill_counted"] is False
    assert result["phases"]["judge"]["roofline_fraction"] == pytest.approx((reads + logprobs + samples) / 10.0, abs=1e-4)
    assert result["phases"]["probes"]["bound_seconds"] == 0
