"""Engine contract on the transformers engine with the tiny model (fast), plus the OpenAI
engine against a scripted local HTTP server (retries, auth and model-not-found paths)."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai.engines import EngineSettings, OpenAISettings, get_engine
from cai.engines.base import ChatPrompt, SamplingSettings, choice_token_ids, normalise
from cai.engines.hf import HFEngine
from cai.engines.openai_engine import OpenAIEngine
from cai.errors import CaiError

PROMPTS = [ChatPrompt.of([{"role": "user", "content": "hello " * k + "there"}]) for k in range(1, 10)]
CHOICE = [ChatPrompt.of([{"role": "user", "content": f"Question {k}: pick one"}], "The answer is: (") for k in range(6)]


@pytest.fixture(scope="module")
def engine(tiny_causal_lm_dir):
    return HFEngine(str(tiny_causal_lm_dir), batch_size=4)


def test_greedy_is_deterministic_and_prompt_dependent(engine):
    greedy = SamplingSettings(temperature=0, max_tokens=10)
    first = [g.texts[0] for g in engine.generate(PROMPTS, greedy)]
    again = [g.texts[0] for g in engine.generate(PROMPTS, greedy)]
    assert first == again
    assert len(set(first)) > 1


def test_batched_greedy_equals_one_at_a_time(engine, tiny_causal_lm_dir):
    greedy = SamplingSettings(temperature=0, max_tokens=10)
    batched = engine.generate(PROMPTS, greedy)
    single = HFEngine(str(tiny_causal_lm_dir), batch_size=1).generate(PROMPTS, greedy)
    assert [g.texts for g in batched] == [g.texts for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]


def test_n_samples_are_distinct_and_counted(engine):
    out = engine.generate(PROMPTS[:3], SamplingSettings(n=4, temperature=1.0, max_tokens=12, seed=0))
    for generation in out:
        assert len(generation.texts) == 4 and len(set(generation.texts)) == 4
        assert all(0 < c <= 12 for c in generation.completion_tokens)
        assert set(generation.finish_reasons) <= {"stop", "length"}


def test_seeded_sampling_reproducible(engine):
    settings = SamplingSettings(n=2, temperature=1.0, max_tokens=8, seed=5)
    assert [g.texts for g in engine.generate(PROMPTS[:4], settings)] == [
        g.texts for g in engine.generate(PROMPTS[:4], settings)
    ]


def test_stop_strings_truncate(engine):
    free = engine.generate(PROMPTS[:1], SamplingSettings(temperature=0, max_tokens=20))[0].texts[0]
    stop = free[3:5]
    stopped = engine.generate(PROMPTS[:1], SamplingSettings(temperature=0, max_tokens=20, stop=(stop,)))[0]
    assert stopped.texts[0] == free[: free.find(stop)]
    assert stopped.finish_reasons == ["stop"]


def test_choice_probabilities_sum_to_one_and_match_logits(engine):
    import torch

    scores = engine.score_choices(CHOICE, ["A", "B"])
    assert len(scores.probs) == len(CHOICE)
    for probs, mass in zip(scores.probs, scores.mass):
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-9) and all(0 < p < 1 for p in probs)
        assert 0 < mass <= 1
    # Same numbers as a direct forward pass on one prompt.
    text = engine.render(CHOICE[2])
    ids = choice_token_ids(engine.tokenizer, text, ["A", "B"])
    encoded = engine.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = engine.lm(**encoded).logits[0, -1]
    direct = torch.softmax(logits[ids], dim=-1).tolist()
    assert scores.probs[2] == pytest.approx(direct, abs=1e-5)


def test_choices_sharing_a_first_token_are_rejected(engine):
    with pytest.raises(CaiError, match="share a first token"):
        engine.score_choices(CHOICE[:1], ["A", "A"])


def test_lora_adapter_per_call(engine, tiny_causal_lm_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    local = HFEngine(str(tiny_causal_lm_dir), batch_size=4, adapters={"tuned": str(tmp_path / "adapter")})
    base_scores = [p[0] for p in local.score_choices(CHOICE, ["A", "B"]).probs]
    tuned_scores = [p[0] for p in local.score_choices(CHOICE, ["A", "B"], adapter="tuned").probs]
    plain_scores = [p[0] for p in engine.score_choices(CHOICE, ["A", "B"]).probs]
    assert base_scores == pytest.approx(plain_scores, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(tuned_scores, base_scores)) > 1e-2
    with pytest.raises(CaiError, match="unknown adapter"):
        local.score_choices(CHOICE, ["A", "B"], adapter="missing")


def test_normalise():
    probs, mass = normalise([math.log(0.3), math.log(0.1)])
    assert probs == pytest.approx([0.75, 0.25]) and mass == pytest.approx(0.4)
    assert normalise([-math.inf, -math.inf]) == ([0.5, 0.5], 0.0)


def test_auto_falls_back_to_hf_when_vllm_missing(tiny_causal_lm_dir, monkeypatch, caplog):
    import builtins

    import cai.engines as engines

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("no vllm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.setattr(engines, "_ENGINES", {})
    with caplog.at_level("INFO"):
        engine = get_engine(str(tiny_causal_lm_dir), EngineSettings(kind="auto"))
    assert engine.name == "hf"
    assert "vLLM not importable" in caplog.text
    assert get_engine(str(tiny_causal_lm_dir), EngineSettings(kind="auto")) is engine  # reused


def test_unknown_engine_kind():
    with pytest.raises(CaiError, match="engine.kind"):
        EngineSettings(kind="tgi")


# -- OpenAI-compatible engine against a scripted server ----------------------------------------


class Script:
    def __init__(self):
        self.failures_before_success = 0
        self.status = 200
        self.seen: list[dict] = []
        self.headers: list[dict] = []


def serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.seen.append({"path": self.path, **body})
            script.headers.append(dict(self.headers))
            if script.status != 200:
                return self._send(script.status, {"error": {"message": "The model `x` does not exist."}})
            if script.failures_before_success > 0:
                script.failures_before_success -= 1
                return self._send(503, {"error": {"message": "busy"}})
            if body.get("max_tokens") == 1:
                top = {"A": math.log(0.6), " B": math.log(0.2), "B": math.log(0.1), "C": math.log(0.05)}
                if self.path.endswith("/chat/completions"):
                    entries = [{"token": t, "logprob": lp} for t, lp in top.items()]
                    choice = {"index": 0, "message": {"content": "A"}, "logprobs": {"content": [{"token": "A", "top_logprobs": entries}]}}
                else:
                    choice = {"index": 0, "text": "A", "logprobs": {"top_logprobs": [top]}}
                return self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
            n = body.get("n", 1)
            key = "text" if "prompt" in body else "message"
            choices = [
                {"index": i, key: (f"answer {i} END tail" if key == "text" else {"content": f"answer {i}"}), "finish_reason": "stop"}
                for i in reversed(range(n))
            ]
            return self._send(200, {"choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 4 * n}})

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def scripted():
    script = Script()
    server = serve(script)
    yield script, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def openai_engine(url, **overrides):
    settings = OpenAISettings(base_urls=(url,), backoff_s=0.01, max_retries=3, **overrides)
    return OpenAIEngine("served-model", settings)


def test_openai_chat_generate_and_key_header(scripted, monkeypatch):
    script, url = scripted
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    out = openai_engine(url).generate(CHOICE[:2], SamplingSettings(n=2, max_tokens=8))
    assert [g.texts for g in out] == [["answer 0", "answer 1"]] * 2
    assert out[0].prompt_tokens == 7 and out[0].completion_tokens == [4, 4]
    request = script.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["continue_final_message"] is True
    assert request["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    assert script.headers[0]["Authorization"] == "Bearer sk-test-secret"


def test_openai_completions_with_local_tokenizer(scripted, tiny_tokenizer_dir):
    script, url = scripted
    engine = openai_engine(url, tokenizer=str(tiny_tokenizer_dir))
    out = engine.generate(CHOICE[:1], SamplingSettings(max_tokens=8, stop=(" END",)))
    assert out[0].texts == ["answer 0"] and out[0].finish_reasons == ["stop"]
    assert script.seen[0]["path"] == "/v1/completions"
    assert script.seen[0]["prompt"].endswith("<|im_start|>assistant\nThe answer is: (")


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_openai_choice_scores_merge_space_variants(scripted, tiny_tokenizer_dir, with_tokenizer):
    _, url = scripted
    engine = openai_engine(url, tokenizer=str(tiny_tokenizer_dir) if with_tokenizer else None)
    scores = engine.score_choices(CHOICE[:2], ["A", "B"])
    assert scores.probs[0] == pytest.approx([0.6 / 0.9, 0.3 / 0.9])
    assert scores.mass[0] == pytest.approx(0.9)


def test_openai_retries_then_succeeds(scripted):
    script, url = scripted
    script.failures_before_success = 2
    out = openai_engine(url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    assert out[0].texts == ["answer 0"] and len(script.seen) == 3


def test_openai_gives_up_after_retries(scripted):
    script, url = scripted
    script.failures_before_success = 100
    with pytest.raises(CaiError, match="kept failing .HTTP 503. after 3 retries"):
        openai_engine(url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))


def test_openai_auth_error_is_clear_and_hides_key(scripted, monkeypatch):
    script, url = scripted
    script.status = 401
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    with pytest.raises(CaiError) as err:
        openai_engine(url, api_key_env="MY_KEY").generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    assert "authentication failed" in str(err.value) and "$MY_KEY" in str(err.value)
    assert "sk-very-secret" not in str(err.value)
    assert len(script.seen) == 1  # not retried


def test_openai_model_not_found(scripted):
    script, url = scripted
    script.status = 404
    with pytest.raises(CaiError, match="model 'served-model' not found"):
        openai_engine(url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))


def test_openai_unreachable_server_fails_cleanly():
    engine = openai_engine("http://127.0.0.1:9/v1")
    with pytest.raises(CaiError, match="kept failing"):
        engine.generate(CHOICE[:1], SamplingSettings(max_tokens=4))


def test_per_prompt_seeds_make_samples_independent_of_batching(engine, tiny_causal_lm_dir):
    sampling = SamplingSettings(n=2, temperature=1.0, top_p=0.9, max_tokens=10)
    seeds = list(range(100, 100 + len(PROMPTS)))
    together = engine.generate(PROMPTS, sampling, seeds=seeds)
    alone = HFEngine(str(tiny_causal_lm_dir), batch_size=1)
    subset = [3, 7, 1]
    apart = alone.generate([PROMPTS[i] for i in subset], sampling, seeds=[seeds[i] for i in subset])
    assert [together[i].texts for i in subset] == [g.texts for g in apart]
    assert len(set(together[0].texts)) == 2
    reseeded = engine.generate(PROMPTS[:2], sampling, seeds=[1, 2])
    assert [g.texts for g in reseeded] != [g.texts for g in together[:2]]
