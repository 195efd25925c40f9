"""The OpenAI-compatible engine as a fleet client (issue 20): each attempt picks a server, dead
servers fail over and cool down, Retry-After is honoured, a request out of retries stops its call
with one counted error after the others are cancelled, and LoRA adapters are loaded into vLLM
servers through their runtime endpoint. Small real HTTP servers in threads; no timed kills."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai.engines import _attach
from cai.engines.base import ChatPrompt, SamplingSettings
from cai.engines.openai_engine import OpenAIEngine, OpenAISettings
from cai.engines.openai_fleet import Fleet, Server, retry_after_s
from cai.errors import CaiError

DROP = "drop"  # answer nothing and close the connection, as a server dying mid-request does
SAMPLING = SamplingSettings(max_tokens=4)


def prompts(n, word="p"):
    return [ChatPrompt.of([{"role": "user", "content": f"{word}{i}"}]) for i in range(n)]


def completion(body):
    """A chat completion echoing the last user message, so results can be matched to prompts."""
    text = "re: " + body["messages"][-1]["content"]
    return 200, {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, {}


class Fake:
    """A local HTTP server; `respond(fake, method, path, body)` returns (status, payload, headers) or DROP."""

    def __init__(self, respond=None):
        self.respond = respond or (lambda fake, method, path, body: completion(body))
        self.seen: list[tuple[float, str, str, dict]] = []  # (monotonic time, method, path, body)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                with fake.lock:
                    fake.seen.append((time.monotonic(), method, self.path, body))
                answer = fake.respond(fake, method, self.path, body)
                if answer == DROP:
                    self.close_connection = True
                    return
                status, payload, headers = answer
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Listener(ThreadingHTTPServer):
            request_queue_size = 64  # the default 5 drops concurrent connects, which then retry after 1 s

        self.server = Listener(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def posts(self, path):
        return [body for _, method, p, body in self.seen if method == "POST" and p == "/v1" + path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fakes():
    started = []

    def start(respond=None):
        started.append(Fake(respond))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more: connections are refused


def engine(*urls, **overrides):
    settings = dict(base_urls=urls, backoff_s=0.01, max_retries=3, cooldown_s=30.0)
    return OpenAIEngine("served-model", OpenAISettings(**{**settings, **overrides}))


# -- server choice per attempt, fail-over and cool-down -----------------------------------------------


def dies_after(k):
    def respond(fake, method, path, body):
        return completion(body) if len(fake.seen) <= k else DROP
    return respond


@pytest.mark.parametrize("dead", ["closed port", "dies after 2 answers"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_dead_server_fails_over_and_cools_down(fakes, dead, concurrency):
    live = fakes()
    dead_url = closed_port_url() if dead == "closed port" else fakes(dies_after(2)).url
    # backoff 5 s: once failed, the dead server is left alone for longer than this whole call takes.
    fleet_engine = engine(dead_url, live.url, backoff_s=5.0, max_concurrency=concurrency)
    out = fleet_engine.generate(prompts(20), SAMPLING)
    assert [g.texts for g in out] == [[f"re: p{i}"] for i in range(20)]  # every row, in order
    dead_server, live_server = fleet_engine._fleet.servers
    assert dead_server.failures >= 1 and dead_server.cool_until > time.monotonic()
    if concurrency == 1:  # one attempt at a time: after its failure, the dead server is skipped
        answered = 0 if dead == "closed port" else 2
        assert dead_server.attempts <= answered + 1
        assert live_server.attempts >= 20 - answered


def test_cool_down_grows_with_consecutive_failures_and_success_resets_it():
    now = [100.0]
    servers = [Server("http://a/v1", None, "http://a/v1"), Server("http://b/v1", None, "http://b/v1")]
    fleet = Fleet(servers, backoff_s=1.0, cooldown_s=5.0, max_retry_after_s=60.0, clock=lambda: now[0])
    a, b = servers
    assert fleet.pick() is a and fleet.pick() is b and fleet.pick() is a  # round-robin
    assert fleet.failed(a) == 1.0
    assert fleet.failed(a) == 1.0  # a second request already in flight: the same episode
    assert fleet.pick() is b and fleet.pick() is b  # a is skipped while cooling down
    now[0] += 1.0
    assert fleet.pick() is a
    assert fleet.failed(a) == 2.0  # tried again and failed again: twice as long
    now[0] += 2.0
    fleet.failed(a)
    now[0] += 4.0
    assert fleet.failed(a) == 5.0  # 8 s, capped at cooldown_s
    fleet.failed(b, retry_after_s=7.5)
    assert fleet.pick() is None  # both cooling
    fleet.succeeded(a)
    assert a.failures == 0 and fleet.pick() is a


# -- Retry-After --------------------------------------------------------------------------------------


def busy_first(headers):
    def respond(fake, method, path, body):
        return (429, {"error": {"message": "slow down"}}, headers) if len(fake.seen) == 1 else completion(body)
    return respond


def test_retry_after_is_honoured(fakes):
    server = fakes(busy_first({"Retry-After": "0.2"}))
    out = engine(server.url, backoff_s=0.001).generate(prompts(1), SAMPLING)
    assert out[0].texts == ["re: p0"] and len(server.seen) == 2
    assert server.seen[1][0] - server.seen[0][0] >= 0.2


def test_retry_after_is_capped(fakes):
    server = fakes(busy_first({"Retry-After": "3600"}))
    began = time.monotonic()
    out = engine(server.url, backoff_s=0.001, max_retry_after_s=0.3).generate(prompts(1), SAMPLING)
    assert out[0].texts == ["re: p0"]
    assert 0.3 <= server.seen[1][0] - server.seen[0][0] and time.monotonic() - began < 10


def test_retry_after_sends_the_request_to_another_server_meanwhile(fakes):
    busy = fakes(lambda fake, method, path, body: (503, {"error": {"message": "busy"}}, {"Retry-After": "30"}))
    live = fakes()
    began = time.monotonic()
    out = engine(busy.url, live.url, max_concurrency=1).generate(prompts(6), SAMPLING)
    assert [g.texts for g in out] == [[f"re: p{i}"] for i in range(6)]
    assert len(busy.seen) == 1 and time.monotonic() - began < 10  # asked once, then left alone for 30 s


def test_retry_after_header_forms():
    assert retry_after_s("0.2") == 0.2 and retry_after_s(" 5 ") == 5.0 and retry_after_s("-3") == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("nan") is None
    # An HTTP-date: 1994-11-06 08:49:37 GMT is 784111777 s after the epoch.
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT", now=784111777 - 12) == pytest.approx(12)
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 -0000", now=784111777 - 3) == pytest.approx(3)
    assert retry_after_s("Sun, 06 Nov 1994 08:49:37 GMT", now=784111777 + 60) == 0.0  # already past


# -- a request out of retries -------------------------------------------------------------------------


def fails_for(word, status=503):
    def respond(fake, method, path, body):
        if word in body["messages"][-1]["content"]:
            return status, {"error": {"message": "overloaded"}}, {}
        return completion(body)
    return respond


def test_one_request_out_of_retries_fails_the_call_with_a_count(fakes):
    server = fakes(fails_for("bad"))
    batch = prompts(2) + prompts(1, "bad")
    with pytest.raises(CaiError) as err:
        engine(server.url, max_retries=2).generate(batch, SAMPLING)
    message = str(err.value)
    assert message.startswith("1 of 3 requests failed") and "\n" not in message
    assert f"{server.url}/chat/completions kept failing (HTTP 503) after 2 retries" in message
    assert len(server.posts("/chat/completions")) == 2 + 3  # the good two once, the bad one 1 + 2 retries


def test_failing_request_cancels_the_others_in_flight(fakes):
    release = threading.Event()

    def respond(fake, method, path, body):
        if "slow" in body["messages"][-1]["content"]:
            release.wait(20)  # held until the test ends: only cancelling frees the call
            return completion(body)
        return 400, {"error": {"message": "prompt too long"}}, {}

    server = fakes(respond)
    began = time.monotonic()
    try:
        with pytest.raises(CaiError) as err:
            engine(server.url).generate(prompts(2, "slow") + prompts(1, "bad"), SAMPLING)
    finally:
        release.set()
    assert time.monotonic() - began < 10
    assert str(err.value).startswith("1 of 3 requests failed, 2 cancelled") and "prompt too long" in str(err.value)


def test_failures_on_several_servers_are_named(fakes):
    a, b = fakes(fails_for("p")), fakes(fails_for("p"))
    with pytest.raises(CaiError) as err:
        engine(a.url, b.url, max_retries=1).generate(prompts(1), SAMPLING)
    message = str(err.value)
    assert message.startswith("1 of 1 requests failed") and a.url in message and b.url in message
    assert "kept failing (HTTP 503 from " in message


# -- LoRA adapters ------------------------------------------------------------------------------------


def vllm_with_lora(loaded=None, endpoint=True):
    """A vLLM-like server: runtime LoRA loading (when `endpoint`), /models listing adapters' roots."""
    loaded = {} if loaded is None else loaded

    def respond(fake, method, path, body):
        if path == "/v1/models":
            cards = [{"id": "served-model", "root": "/models/base"}] + [{"id": n, "root": p} for n, p in loaded.items()]
            return 200, {"object": "list", "data": cards}, {}
        if path.endswith("_lora_adapter") and not endpoint:
            return 404, {"detail": "Not Found"}, {}
        if path == "/v1/load_lora_adapter":
            if body["lora_name"] in loaded:
                return 400, {"object": "error", "message": f"The lora adapter '{body['lora_name']}' has already been "
                             "loaded.", "type": "InvalidUserInput", "code": 400}, {}
            loaded[body["lora_name"]] = body["lora_path"]
            return 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.", {}
        if path == "/v1/unload_lora_adapter":
            loaded.pop(body["lora_name"])
            return 200, "Success", {}
        if body.get("model") not in ("served-model", *loaded):
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}, {}
        return completion(body)

    return respond


def test_add_adapter_loads_into_every_server_and_requests_name_it(fakes):
    servers = [fakes(vllm_with_lora()), fakes(vllm_with_lora())]
    served = engine(*(s.url for s in servers))
    served.add_adapter("policy", "/shared/runs/x/policy")
    for server in servers:
        assert server.posts("/load_lora_adapter") == [{"lora_name": "policy", "lora_path": "/shared/runs/x/policy"}]
    out = served.generate(prompts(4), SAMPLING, adapter="policy")
    assert [g.texts for g in out] == [[f"re: p{i}"] for i in range(4)]
    models = [b["model"] for s in servers for b in s.posts("/chat/completions")]
    assert models == ["policy"] * 4 and all(s.posts("/chat/completions") for s in servers)


def test_loading_an_adapter_honours_retry_after(fakes):
    """A busy server (503 + Retry-After) is asked again only after the time it gave, like requests."""
    lora = vllm_with_lora()

    def respond(fake, method, path, body):
        if path == "/v1/load_lora_adapter" and len(fake.posts("/load_lora_adapter")) == 1:
            return 503, {"error": {"message": "busy"}}, {"Retry-After": "0.3"}
        return lora(fake, method, path, body)

    server = fakes(respond)
    engine(server.url).add_adapter("policy", "/shared/policy")
    loads = [t for t, method, path, _ in server.seen if path == "/v1/load_lora_adapter"]
    assert len(loads) == 2 and loads[1] - loads[0] >= 0.3


def test_adapter_given_at_start_is_loaded(fakes):
    server = fakes(vllm_with_lora())
    OpenAIEngine("served-model", OpenAISettings(base_urls=(server.url,)), adapters={"sft": "/shared/sft"})
    assert server.posts("/load_lora_adapter") == [{"lora_name": "sft", "lora_path": "/shared/sft"}]


def test_adapter_already_loaded_from_the_same_path_is_kept_and_from_another_is_replaced(fakes):
    loaded = {"policy": "/shared/old"}
    server = fakes(vllm_with_lora(loaded))
    served = engine(server.url)
    served.add_adapter("policy", "/shared/old")  # e.g. listed with --lora-modules policy=/shared/old
    assert server.posts("/unload_lora_adapter") == [] and loaded == {"policy": "/shared/old"}
    served.add_adapter("policy", "/shared/new")
    assert server.posts("/unload_lora_adapter") == [{"lora_name": "policy"}] and loaded == {"policy": "/shared/new"}
    assert served.generate(prompts(1), SAMPLING, adapter="policy")[0].texts == ["re: p0"]


def test_server_without_runtime_lora_loading_is_a_clear_error(fakes):
    server = fakes(vllm_with_lora(endpoint=False))
    served = engine(server.url)
    with pytest.raises(CaiError) as err:
        served.add_adapter("policy", "/shared/policy")
    message = str(err.value)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message and "--enable-lora" in message
    assert "--lora-modules policy=/shared/policy" in message and "\n" not in message
    with pytest.raises(CaiError, match="adapter 'policy' was not loaded"):  # not recorded as loaded
        served.generate(prompts(1), SAMPLING, adapter="policy")


def test_adapter_the_server_cannot_read_is_a_clear_error(fakes):
    def respond(fake, method, path, body):
        return 404, {"error": {"message": "Loading lora policy failed: No adapter found for /nowhere",
                               "type": "NotFoundError", "code": 404}}, {}

    with pytest.raises(CaiError, match="could not find adapter 'policy' at /nowhere.*read by the server"):
        engine(fakes(respond).url).add_adapter("policy", "/nowhere")


def test_unknown_adapter_is_refused_before_any_request(fakes):
    server = fakes(vllm_with_lora())
    served = engine(server.url)
    served.add_adapter("policy", "/shared/policy")
    before = len(server.seen)
    for call in (lambda: served.generate(prompts(2), SAMPLING, adapter="nope"),
                 lambda: served.score_choices(prompts(2), ["A", "B"], adapter="nope")):
        with pytest.raises(CaiError, match="adapter 'nope' was not loaded into the servers .loaded: policy."):
            call()
    assert len(server.seen) == before


def test_eval_stage_attaches_adapters_to_a_served_engine(fakes):
    """`get_engine` attaches a run's adapters with `_attach` (the eval stage's policy): this used to be
    an AttributeError on the OpenAI engine."""
    server = fakes(vllm_with_lora())
    served = engine(server.url)
    _attach(served, {"policy": "/some/dir"})
    assert server.posts("/load_lora_adapter") == [{"lora_name": "policy", "lora_path": "/some/dir"}]
    assert served.generate(prompts(1), SAMPLING, adapter="policy")[0].texts == ["re: p0"]
