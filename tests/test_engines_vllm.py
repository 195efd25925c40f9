"""Engine contract on the real SmolLM2 through vLLM (offline and as an OpenAI-compatible server).

Slow: vLLM takes 20-40 s to start on a CPU. Run with `make test-slow`.
"""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cai.engines.base import ChatPrompt, SamplingSettings

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 2+2?", "Name a colour.", "Say hello to my friend Sam.", "What is the capital of France?"]
PROMPTS = [ChatPrompt.of([{"role": "user", "content": q}]) for q in QUESTIONS]
CHOICE = [
    ChatPrompt.of([{"role": "user", "content": f"Which is a fruit? Options: (A) {a} (B) {b}"}], "The answer is: (")
    for a, b in [("apple", "car"), ("table", "banana"), ("pear", "rock")]
]


@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir):
    from cai.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(smollm2_dir):
    from cai.engines.hf import HFEngine

    return HFEngine("smollm2-135m-instruct", batch_size=8)


def test_vllm_greedy_deterministic_and_equal_to_hf(vllm_engine, hf_engine):
    greedy = SamplingSettings(temperature=0, max_tokens=24)
    first = vllm_engine.generate(PROMPTS, greedy)
    assert [g.texts for g in first] == [g.texts for g in vllm_engine.generate(PROMPTS, greedy)]
    reference = hf_engine.generate(PROMPTS, greedy)
    agree = sum(a.texts == b.texts for a, b in zip(first, reference))
    assert agree >= len(PROMPTS) - 1  # fp32 on both; one near-tie may flip
    assert [g.prompt_tokens for g in first] == [g.prompt_tokens for g in reference]


def test_vllm_n_samples_distinct(vllm_engine):
    out = vllm_engine.generate(PROMPTS[:2], SamplingSettings(n=4, temperature=1.0, max_tokens=16, seed=1))
    for generation in out:
        assert len(generation.texts) == 4 and len(set(generation.texts)) == 4
        assert all(0 < c <= 16 for c in generation.completion_tokens)


def test_vllm_choice_scores_agree_with_hf(vllm_engine, hf_engine):
    fast = vllm_engine.score_choices(CHOICE, ["A", "B"])
    slow = hf_engine.score_choices(CHOICE, ["A", "B"])
    for a, b in zip(fast.probs, slow.probs):
        assert sum(a) == pytest.approx(1.0)
        assert a == pytest.approx(b, abs=2e-3)
    assert fast.mass == pytest.approx(slow.mass, abs=2e-3)
    assert fast.prompt_tokens == slow.prompt_tokens  # the same rendered prompts, counted the same


def test_vllm_reports_prefix_cache_hits(vllm_engine):
    """A prompt seen before is served from the prefix cache in whole blocks (128 tokens on a CPU),
    never its last token; the counts reach `Generation` and `ChoiceScores` (issue 22)."""
    vllm_engine.llm.reset_prefix_cache()
    long = [ChatPrompt.of([{"role": "user", "content": "Tell me about bread. " * 60 + q}]) for q in QUESTIONS[:2]]
    first = vllm_engine.generate(long[:1], SamplingSettings(temperature=0, max_tokens=4))[0]
    assert first.prompt_tokens > 256 and first.cached_tokens == 0
    again = vllm_engine.generate(long, SamplingSettings(temperature=0, max_tokens=4))
    block = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert again[0].cached_tokens == (again[0].prompt_tokens - 1) // block * block > 0
    assert 0 < again[1].cached_tokens < again[1].prompt_tokens  # shares the long start only
    scores = vllm_engine.score_choices(long, ["A", "B"])
    assert scores.prompt_tokens == [g.prompt_tokens for g in again]
    assert scores.cached_tokens[0] == again[0].cached_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir):
    from cai.engines.vllm_engine import configure_environment

    configure_environment()
    port = _free_port()
    log = open(smollm2_dir.parent / f"vllm-server-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
         "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "2048"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm server exited early; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    else:
        proc.kill()
        pytest.fail("vllm server did not become healthy in 240 s")
    yield url + "/v1"
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a server that ignores SIGTERM must not outlive the tests
        proc.kill()
        proc.wait(timeout=30)
    log.close()


def test_openai_engine_against_real_vllm_server(vllm_server, hf_engine, smollm2_dir):
    from cai.engines.openai_engine import OpenAIEngine, OpenAISettings
    from cai.errors import CaiError

    completions = OpenAIEngine("smol", OpenAISettings(base_urls=(vllm_server,), tokenizer=str(smollm2_dir)))
    chat = OpenAIEngine("smol", OpenAISettings(base_urls=(vllm_server,)))
    greedy = SamplingSettings(temperature=0, max_tokens=24)
    reference = hf_engine.generate(PROMPTS, greedy)
    served = completions.generate(PROMPTS, greedy)
    assert sum(a.texts == b.texts for a, b in zip(served, reference)) >= len(PROMPTS) - 1
    sampled = chat.generate(PROMPTS[:1], SamplingSettings(n=3, temperature=1.0, max_tokens=12, seed=2))
    assert len(set(sampled[0].texts)) == 3
    for engine in (completions, chat):
        scores = engine.score_choices(CHOICE, ["A", "B"])
        for a, b in zip(scores.probs, hf_engine.score_choices(CHOICE, ["A", "B"]).probs):
            assert a == pytest.approx(b, abs=0.02)  # top-20 logprobs, served in fp32
    with pytest.raises(CaiError, match="not found"):
        OpenAIEngine("no-such-model", OpenAISettings(base_urls=(vllm_server,))).generate(PROMPTS[:1], greedy)
