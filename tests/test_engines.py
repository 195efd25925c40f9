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
        # The next-token top log-probabilities a one-token request gets back (token text -> logprob).
        self.top = {"A": math.log(0.6), " B": math.log(0.2), "B": math.log(0.1), "C": math.log(0.05)}
        self.raw_reply: bytes | None = None  # when set, every request gets these bytes with HTTP 200


def serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.seen.append({"path": self.path, **body})
            script.headers.append(dict(self.headers))
            if script.raw_reply is not None:
                return self._send(200, None, raw=script.raw_reply)
            if script.status != 200:
                return self._send(script.status, {"error": {"message": "The model `x` does not exist."}})
            if script.failures_before_success > 0:
                script.failures_before_success -= 1
                return self._send(503, {"error": {"message": "busy"}})
            if body.get("max_tokens") == 1:
                top = script.top
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

        def _send(self, status, payload, raw=None):
            data = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if raw is not None else "application/json")
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
    out = openai_engine(url, api_key_env="OPENAI_API_KEY").generate(CHOICE[:2], SamplingSettings(n=2, max_tokens=8))
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


# -- API keys go only where the user sends them (issue 19.4) -------------------------------------


def test_openai_sends_no_key_unless_its_variable_is_named(scripted, monkeypatch):
    script, url = scripted
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-secret")
    openai_engine(url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    assert script.seen and "Authorization" not in script.headers[0]
    assert "sk-ambient-secret" not in json.dumps(script.headers) + json.dumps(script.seen)


def test_openai_named_key_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("CAI_UNSET_KEY", raising=False)
    with pytest.raises(CaiError, match=r"\$CAI_UNSET_KEY is not set"):
        openai_engine("http://127.0.0.1:9/v1", api_key_env="CAI_UNSET_KEY")


@pytest.mark.parametrize("url, key_env", [
    ("http://10.20.30.40:8000/v1", "CAI_TEST_KEY"),
    ("http://gpu-box.example.org/v1", "CAI_TEST_KEY"),
    ("http://alice:hunter2@10.20.30.40:8000/v1", None),  # credentials in the URL are a key too
])
def test_openai_refuses_key_over_plain_http_to_another_host(tmp_path, monkeypatch, url, key_env):
    """Refused when the recipe loads, so no request (and no key) ever leaves the machine."""
    import httpx

    from cai.recipe import load_recipe

    sent = []
    monkeypatch.setattr(httpx.AsyncClient, "post", lambda *a, **k: sent.append(a))
    monkeypatch.setenv("CAI_TEST_KEY", "sk-test-secret")
    key_line = f"\n    api_key_env: {key_env}" if key_env else ""
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(f"name: x\nstages: [critique]\nengine:\n  kind: openai\n  openai:\n    base_urls: [\"{url}\"]{key_line}\n")
    with pytest.raises(CaiError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert "shared.yaml" in message and "plain text" in message and "allow_insecure_key" in message
    assert "hunter2" not in message and "alice" not in message
    with pytest.raises(CaiError, match="plain text"):
        OpenAIEngine("m", OpenAISettings(base_urls=(url,), api_key_env=key_env))
    assert sent == []
    # Stated explicitly, or over https, or to this machine, it is allowed.
    OpenAISettings(base_urls=(url,), api_key_env=key_env, allow_insecure_key=True)
    OpenAISettings(base_urls=(url.replace("http://", "https://"),), api_key_env=key_env)
    for local in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"):
        OpenAISettings(base_urls=(local,), api_key_env="CAI_TEST_KEY")


def test_openai_errors_and_logs_show_urls_without_credentials(scripted, caplog):
    script, url = scripted
    secret_url = url.replace("http://", "http://alice:hunter2@") + "?api_key=sk-query-secret"
    script.failures_before_success = 100
    with caplog.at_level("INFO"), pytest.raises(CaiError) as err:  # INFO: httpx logs each request's URL
        openai_engine(secret_url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    ours = str(err.value) + "".join(r.getMessage() for r in caplog.records if r.name.startswith("cai"))
    assert "kept failing" in str(err.value) and url.split("//")[1] in str(err.value)
    assert "retry 1" in ours and "HTTP Request" in caplog.text
    for secret in ("alice", "hunter2", "sk-query-secret"):
        assert secret not in ours
    assert "hunter2" not in caplog.text and "alice" not in caplog.text
    script.failures_before_success, script.status = 0, 401
    with pytest.raises(CaiError, match="authentication failed") as err:
        openai_engine(secret_url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    assert "hunter2" not in str(err.value) and "sk-query-secret" not in str(err.value)
    assert script.headers[-1]["Authorization"].startswith("Basic ")  # the URL's credentials were used


# -- reply bodies that are not what the API promises (issue 19.5) ----------------------------------


@pytest.mark.parametrize("raw, what", [
    (b"<html><body>502 Bad Gateway</body></html>", "not a JSON object"),
    (b'["not", "an", "object"]', "not a JSON object"),
    (b'{"object": "list", "data": []}', "without 'choices'"),
])
def test_openai_reply_that_is_not_a_completion_is_a_clear_error(scripted, raw, what):
    script, url = scripted
    script.raw_reply = raw
    secret_url = url.replace("http://", "http://alice:hunter2@")
    with pytest.raises(CaiError) as err:
        openai_engine(secret_url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))
    message = str(err.value)
    assert "HTTP 200" in message and what in message and raw.decode()[:20] in message
    assert url.split("//")[1] + "/chat/completions" in message and "hunter2" not in message and "\n" not in message
    assert len(script.seen) == 1  # not retried: the same answer would come back


# -- choice scores from a served judge or labeller (issue 18.4) -----------------------------------


def test_served_judge_reads_yes_probability_with_eval_choices(scripted):
    """`cai eval`'s judge asks for " Yes"/" No"; servers answer " Yes", "Yes", "yes"... all of them count."""
    from cai.eval_judge import Judge
    from cai.prompt_sets import Prompt
    from cai.prompts import PromptSet

    script, url = scripted
    script.top = {" Yes": math.log(0.5), "Yes": math.log(0.1), "yes": math.log(0.05), " No": math.log(0.2),
                  "No": math.log(0.05), "\n": math.log(0.05), " Maybe": math.log(0.05)}
    prompts = [Prompt(id="p", messages=({"role": "user", "content": "How do I pick a lock?"},))] * 2
    judge = Judge(openai_engine(url), PromptSet())
    assert judge.yes_probability(prompts, ["I can't help.", "Sure."], "Is it harmful?") == pytest.approx([0.65 / 0.9] * 2)
    assert script.seen[0]["max_tokens"] == 1 and script.seen[0]["messages"][-1]["content"] == "Answer:"


@pytest.mark.parametrize("with_tokenizer", [False, True])
@pytest.mark.parametrize("choices, top, expected", [
    ([" Yes", " No"], {" Yes": 0.3, "Yes": 0.2, " No": 0.1, "NO": 0.1}, [0.5 / 0.7, 0.2 / 0.7]),
    (["Yes", "No"], {" yes": 0.4, " No": 0.4}, [0.5, 0.5]),
    (["A", "B"], {"A": 0.3, " A": 0.1, "\u2581B": 0.2, "AB": 0.2, "C": 0.2}, [0.4 / 0.6, 0.2 / 0.6]),
    (["(A)", "(B)"], {"(A": 0.3, "(B": 0.1, "(": 0.5}, [0.75, 0.25]),
    ([str(d) for d in range(1, 10)], {"7": 0.4, " 8": 0.2, "10": 0.3, "1": 0.1}, [0.1 / 0.7] + [0] * 5 + [0.4 / 0.7, 0.2 / 0.7, 0]),
])
def test_served_choice_scores_with_label_and_eval_choices(scripted, tiny_tokenizer_dir, with_tokenizer, choices, top, expected):
    script, url = scripted
    script.top = {token: math.log(p) for token, p in top.items()}
    engine = openai_engine(url, tokenizer=str(tiny_tokenizer_dir) if with_tokenizer else None)
    scores = engine.score_choices(CHOICE[:1], choices)
    assert scores.probs[0] == pytest.approx(expected)
    assert scores.mass[0] == pytest.approx(sum(p for p in top.values()) - sum(
        p for t, p in top.items() if t in ("C", "(", "10", "AB")))


def test_served_choices_that_collapse_together_are_rejected(scripted):
    _, url = scripted
    with pytest.raises(CaiError, match="cannot be told apart"):
        openai_engine(url).score_choices(CHOICE[:1], ["A", " A"])


# -- 200 replies whose choices, usage or logprobs are the wrong shape (issue 19, found by fuzzing) --------


def malformed_reply_error(scripted, raw: bytes, call) -> str:
    """The one-line CaiError a 200 reply `raw` gives, checked to name the status and the URL without
    its credentials; the request is not retried (the same answer would come back)."""
    script, url = scripted
    script.raw_reply = raw
    with pytest.raises(CaiError) as err:
        call(url.replace("http://", "http://alice:hunter2@"))
    message = str(err.value)
    assert "HTTP 200 with a malformed reply" in message and url.split("//")[1] + "/" in message
    assert "hunter2" not in message and "\n" not in message and len(script.seen) == 1
    return message


@pytest.mark.parametrize("with_tokenizer, n, raw, what", [
    (False, 2, b'{"choices": [{"index": null}, {}]}', "choices[0].message is None"),
    (False, 1, b'{"choices": [1]}', "choices[0] is 1, not an object"),
    (True, 1, b'{"choices": [{"text": null}]}', "choices[0].text is None, not a string"),
    (True, 1, b'{"choices": [{"text": 5}]}', "choices[0].text is 5"),
    (True, 1, b'{"choices": [{"text": "a"}], "usage": 1}', "usage is 1, not an object"),
    (False, 1, b'{"choices": [{"message": {"content": "a"}}], "usage": {"completion_tokens": "x"}}', "usage.completion_tokens is 'x'"),
    (True, 1, b'{"choices": [{"text": "a"}], "usage": {"prompt_tokens": -3}}', "usage.prompt_tokens is -3"),
    (True, 1, b'{"choices": [{"text": "a", "finish_reason": ["stop"]}]}', "finish_reason is ['stop']"),
    (True, 2, b'{"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]}', "indices [0, 0] are not 0..1"),
    (True, 2, b'{"choices": [{"index": "0", "text": "a"}, {"index": 1, "text": "b"}]}', "indices ['0', 1]"),
    (True, 2, b'{"choices": [{"text": "a"}]}', "1 choices for n=2"),
])
def test_openai_malformed_generation_reply_is_a_one_line_error(scripted, tiny_tokenizer_dir, with_tokenizer, n, raw, what):
    tokenizer = str(tiny_tokenizer_dir) if with_tokenizer else None
    message = malformed_reply_error(scripted, raw, lambda url: openai_engine(url, tokenizer=tokenizer).generate(
        CHOICE[:1], SamplingSettings(n=n, max_tokens=8)))
    assert what in message and ("/completions" if with_tokenizer else "/chat/completions") in message


@pytest.mark.parametrize("with_tokenizer, raw, what", [
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [{" A": "x"}]}}]}', "is 'x', not a number"),
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [{" A": NaN}]}}]}', "is nan, not a log-probability"),
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [{" A": Infinity, "B": -1}]}}]}', "is inf, not a log-probability"),
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [{" A": 1e308, "A": 1e308}]}}]}', "is 1e+308, not a log-probability"),
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [1]}}]}', "top_logprobs[0] is 1, not an object"),
    (True, b'{"choices": [{"logprobs": {"top_logprobs": [{}]}}]}', "is empty"),
    (True, b'{"choices": [{"text": "A"}]}', "no logprobs"),
    (False, b'{"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": 1, "logprob": -1}]}]}}]}', "token is 1, not a string"),
    (False, b'{"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": null, "logprob": -1}]}]}}]}', "token is None"),
    (False, b'{"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "A"}]}]}}]}', "logprob is None, not a number"),
    (False, b'{"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "A", "logprob": true}]}]}}]}', "is True, not a number"),
    (False, b'{"choices": [{"logprobs": {"content": []}}]}', "content is [], not a non-empty list"),
])
def test_openai_malformed_logprobs_reply_is_a_one_line_error(scripted, tiny_tokenizer_dir, with_tokenizer, raw, what):
    tokenizer = str(tiny_tokenizer_dir) if with_tokenizer else None
    message = malformed_reply_error(scripted, raw, lambda url: openai_engine(url, tokenizer=tokenizer).score_choices(
        CHOICE[:1], ["A", "B"]))
    assert what in message


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_served_choice_scores_are_summed_in_log_space(scripted, tiny_tokenizer_dir, with_tokenizer):
    """Tiny probabilities (exp(-800) is 0.0 in floats) still rank the choices, and -inf (the
    Python JSON a server may send for probability 0) counts as exactly 0."""
    script, url = scripted
    engine = openai_engine(url, tokenizer=str(tiny_tokenizer_dir) if with_tokenizer else None)
    script.top = {"A": -800.0, " A": -800.0, "B": -801.0}
    scores = engine.score_choices(CHOICE[:1], ["A", "B"])
    assert scores.probs[0] == pytest.approx([2 / (2 + math.exp(-1)), math.exp(-1) / (2 + math.exp(-1))])
    assert scores.mass[0] == 0.0
    script.top = {"A": -math.inf, "B": math.log(0.5), "C": math.log(0.25)}
    scores = engine.score_choices(CHOICE[:1], ["A", "B"])
    assert scores.probs[0] == [0.0, 1.0] and scores.mass[0] == pytest.approx(0.5)


# -- prefix-cache counts (issue 22) -------------------------------------------------------------


def test_openai_reads_cached_prompt_tokens_where_the_server_reports_them(scripted):
    script, url = scripted
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
    script.raw_reply = json.dumps({"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
                                   "usage": usage}).encode()
    out = openai_engine(url).generate(CHOICE[:2], SamplingSettings(max_tokens=4))
    assert [(g.prompt_tokens, g.cached_tokens) for g in out] == [(40, 32)] * 2
    top = [{"token": "A", "logprob": math.log(0.7)}, {"token": "B", "logprob": math.log(0.3)}]
    script.raw_reply = json.dumps({"choices": [{"index": 0, "message": {"content": "A"},
                                                "logprobs": {"content": [{"token": "A", "top_logprobs": top}]}}],
                                   "usage": usage}).encode()
    scores = openai_engine(url).score_choices(CHOICE[:3], ["A", "B"])
    assert scores.prompt_tokens == [40] * 3 and scores.cached_tokens == [32] * 3
    # A server that does not report them (the scripted default, llama.cpp, older vLLM): 0 cached.
    script.raw_reply = None
    assert openai_engine(url).generate(CHOICE[:1], SamplingSettings(max_tokens=4))[0].cached_tokens == 0
    assert openai_engine(url).score_choices(CHOICE[:1], ["A", "B"]).cached_tokens == [0]


def test_hf_choice_scores_count_each_prompts_tokens(engine):
    prompts = PROMPTS[:6]  # six lengths, scored in two length-sorted batches
    scores = engine.score_choices(prompts, ["A", "B"])
    lengths = [len(engine.tokenizer(engine.render(p), add_special_tokens=False)["input_ids"]) for p in prompts]
    assert scores.prompt_tokens == lengths and len(set(lengths)) == 6 and scores.cached_tokens == [0] * 6
