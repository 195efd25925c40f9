"""Merged-adapter serving: the merged folder equals base + LoRA, is cached by content, and the vLLM
engine swaps merged weights in and out in place (the one default-run test through real vLLM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cai import merge
from cai.engines.base import ChatPrompt, SamplingSettings


def random_adapter(model_dir: Path, out: Path, seed: int = 0, std: float = 0.05) -> Path:
    """A LoRA adapter with non-zero B (a fresh adapter changes nothing), saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_merged_folder_computes_base_plus_lora(tiny_causal_lm_dir, tmp_path, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(tiny_causal_lm_dir, tmp_path / "adapter")
    folder = merge.merged_model(str(tiny_causal_lm_dir), adapter)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
        plain = base(ids).logits
        lora = PeftModel.from_pretrained(base, str(adapter))(ids).logits
    assert (lora - plain).abs().max() > 1e-3  # the adapter matters...
    assert torch.allclose(merged, lora, atol=1e-5)  # ...and the merged weights reproduce it


def test_merged_folder_is_cached_by_content_and_pruned(tiny_causal_lm_dir, tmp_path, cache, monkeypatch):
    adapter = random_adapter(tiny_causal_lm_dir, tmp_path / "adapter")
    first = merge.merged_model(str(tiny_causal_lm_dir), adapter)
    built = []
    real = merge._merge
    monkeypatch.setattr(merge, "_merge", lambda *a: (built.append(a), real(*a)))
    assert merge.merged_model(str(tiny_causal_lm_dir), adapter) == first and not built  # reused
    random_adapter(tiny_causal_lm_dir, adapter, seed=1)  # retrained in place: new content
    second = merge.merged_model(str(tiny_causal_lm_dir), adapter)
    assert second != first and len(built) == 1
    monkeypatch.setattr(merge, "KEEP", 2)
    os.utime(first, (1, 1))  # the least recently used
    third = merge.merged_model(str(tiny_causal_lm_dir), random_adapter(tiny_causal_lm_dir, tmp_path / "other", seed=2))
    assert sorted(p.name for p in merge.merged_dir().iterdir() if not p.name.startswith(".")) == sorted([second.name, third.name])


def test_not_an_adapter_is_refused(tiny_causal_lm_dir, tmp_path, cache):
    from cai.errors import CaiError

    with pytest.raises(CaiError, match="adapter_config.json"):
        merge.merged_model(str(tiny_causal_lm_dir), tmp_path)


LONG = ("Here is some context about gardening, repeated so that the prompt fills several cache blocks. " * 30).strip()
QUESTIONS = ["What is 2+2?", "Name a colour.", "What is the capital of France?", "How do I boil an egg?"]


@pytest.fixture(scope="module")
def swap_engine(smollm2_dir, tmp_path_factory):
    """One vLLM start for the module: the real SmolLM2 with a random adapter served merged."""
    from cai.engines.vllm_engine import VLLMEngine

    root = tmp_path_factory.mktemp("merge-vllm")
    before = os.environ.get("CAI_CACHE")
    os.environ["CAI_CACHE"] = str(root / "cache")
    adapter = random_adapter(Path(smollm2_dir), root / "adapter", std=0.03)
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=2048, merge_adapters=True, adapters={"policy": str(adapter)})
    yield engine, adapter
    engine.close()
    if before is None:
        os.environ.pop("CAI_CACHE")
    else:
        os.environ["CAI_CACHE"] = before


def test_vllm_swaps_merged_adapter_weights_in_place(swap_engine):
    """The merged adapter's answers match transformers + unmerged LoRA, and going back to the
    base gives the base's answers again (weights reloaded and the prefix cache emptied: the long
    shared prefix would otherwise be served from the adapter's keys and values)."""
    from cai.engines.hf import HFEngine

    engine, adapter = swap_engine
    prompts = [ChatPrompt.of([{"role": "system", "content": LONG}, {"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingSettings(temperature=0.0, max_tokens=24)
    base = [g.texts[0] for g in engine.generate(prompts, greedy)]
    tuned = [g.texts[0] for g in engine.generate(prompts, greedy, adapter="policy")]
    again = [g.texts[0] for g in engine.generate(prompts, greedy)]
    choices = engine.score_choices(prompts[:2], ["Yes", "No"], adapter="policy")
    assert again == base
    assert sum(a != b for a, b in zip(tuned, base)) >= 3  # the adapter changes the answers
    hf = HFEngine("smollm2-135m-instruct", batch_size=4, adapters={"policy": str(adapter)})
    reference = [g.texts[0] for g in hf.generate(prompts, greedy, adapter="policy")]
    assert sum(a == b for a, b in zip(tuned, reference)) >= len(prompts) - 1  # fp32 both; one near-tie may flip
    hf_choices = hf.score_choices(prompts[:2], ["Yes", "No"], adapter="policy")
    for ours, theirs in zip(choices.probs, hf_choices.probs):
        assert ours == pytest.approx(theirs, abs=2e-3)


def test_vllm_generate_groups_gives_each_set_its_own_settings(swap_engine):
    """The eval's batched sets: one vLLM call, each set with its own length limit and stop, the
    rows of separate `generate` calls (greedy: equal but for at most one near-tie per set)."""
    engine, _ = swap_engine
    prompts = [ChatPrompt.of([{"role": "user", "content": q}]) for q in QUESTIONS]
    groups = [(prompts[:3], SamplingSettings(temperature=0.0, max_tokens=24)),
              (prompts[1:], SamplingSettings(temperature=0.0, max_tokens=6)),
              (prompts[2:], SamplingSettings(temperature=0.0, max_tokens=24, stop=(".",)))]
    together = engine.generate_groups(groups, adapter="policy")
    assert [len(rows) for rows in together] == [3, 3, 2]
    for rows, (group, sampling) in zip(together, groups):
        alone = engine.generate(group, sampling, adapter="policy")
        assert sum(a.texts == b.texts for a, b in zip(rows, alone)) >= len(group) - 1
        assert [r.prompt_tokens for r in rows] == [a.prompt_tokens for a in alone]
        assert all(c <= sampling.max_tokens for r in rows for c in r.completion_tokens)
        assert all("." not in t for r in rows for t in r.texts) if sampling.stop else True
    assert max(c for r in together[0] for c in r.completion_tokens) > 6  # the 6-token limit is the second set's only


def test_vllm_kl_logprobs_match_transformers(swap_engine):
    """The eval's KL on vLLM: the sampler's log-probabilities of the sampled ids equal a prefill's
    under the same weights, the reference's equal transformers' on the same ids, samples stop at
    eos (kept) and depend on their own seed only."""
    from transformers import AutoModelForCausalLM

    from cai import chat, models
    from cai.eval_kl import sequence_logprobs

    engine, _ = swap_engine
    texts = [chat.render(engine.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    prompt_ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = engine.sample_token_logprobs(prompt_ids, 40, [11, 12, 13, 14], adapter="policy")
    alone = engine.sample_token_logprobs(prompt_ids[2:], 40, [13, 14], adapter="policy")
    assert [ids for ids, _, _ in alone] == [ids for ids, _, _ in rows[2:]]  # other batch, same samples
    assert [lp for _, lp, _ in alone] == pytest.approx([lp for _, lp, _ in rows[2:]], abs=1e-3)
    responses = [ids for ids, _, _ in rows]
    rescored = engine.sequence_logprobs(prompt_ids, responses, adapter="policy")
    for (ids, sampled, stopped), prefill in zip(rows, rescored):
        assert sampled == pytest.approx(prefill, abs=1e-3 * len(ids))
        assert stopped == (ids[-1] == engine.tokenizer.eos_token_id)
    assert any(stopped for _, _, stopped in rows) or all(len(ids) == 40 for ids, _, _ in rows)
    reference = engine.sequence_logprobs(prompt_ids, responses)  # the base weights
    base = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m-instruct"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = sequence_logprobs(base, prompt_ids, responses, pad_id=engine.tokenizer.eos_token_id)
    assert reference == pytest.approx(expected, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(rescored, reference)) > 0.5  # policy and reference differ


def test_vllm_prefix_cache_serves_a_short_shared_prefix(swap_engine):
    """Both orders of a labelling pair share a prefix of about 100 tokens: on CPU the engine's
    32-token cache blocks serve most of it to the second order (vLLM's CPU default, 128-token
    blocks, served none of it)."""
    engine, _ = swap_engine
    rule = "Which response is more helpful, honest and harmless? Answer with (A) or (B) only. " * 4
    first = ChatPrompt.of([{"role": "user", "content": f"{rule}\n(A) Paris.\n(B) Lyon."}])
    second = ChatPrompt.of([{"role": "user", "content": f"{rule}\n(A) Lyon.\n(B) Paris."}])
    engine.score_choices([first], ["A", "B"])
    scores = engine.score_choices([second], ["A", "B"])
    shared = len(os.path.commonprefix([engine.tokenizer(engine.render(p), add_special_tokens=False)["input_ids"]
                                       for p in (first, second)]))
    assert 64 <= shared < 128
    assert scores.cached_tokens[0] >= shared - 32


def _rss_gib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


@pytest.mark.skipif(torch.cuda.is_available(), reason="the in-process engine is the CPU path")
def test_cpu_vllm_engine_runs_in_this_process_and_leaves_threads_and_memory_to_the_run(smollm2_dir):
    """On a CPU the engine runs here (no spawned EngineCore/Worker: ~17 s less start-up), and
    what the in-process worker changes does not outlive it for the stages that follow in the same
    `cai run`: `torch.set_num_threads` still works (vLLM replaces it with a no-op) and closing the
    engine gives its KV cache back."""
    import psutil

    from cai.engines.vllm_engine import VLLMEngine

    threads = torch.get_num_threads()
    variable_set = "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ
    before = _rss_gib()
    children = set(psutil.Process().children(recursive=True))  # earlier tests' helpers (a resource tracker) may live on
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=1024, kv_cache_gib=1)
    try:
        assert set(psutil.Process().children(recursive=True)) - children == set()
        assert ("VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ) == variable_set  # nothing started later inherits it
        answer = engine.generate([ChatPrompt.of([{"role": "user", "content": "Name a colour."}])],
                                 SamplingSettings(temperature=0.0, max_tokens=8))
        assert answer[0].completion_tokens[0] > 0
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    loaded = _rss_gib()
    assert loaded - before > 1.0  # the 1 GiB KV cache (zero-filled at start) and the weights
    engine.close()
    assert loaded - _rss_gib() > 0.9
