"""The OpenAI-compatible engine: a fleet of `vllm serve` (or llama.cpp, TGI...) servers.

Requests go out concurrently (bounded by `max_concurrency`) and each attempt picks a server
round-robin over `base_urls`, so several servers share a batch. 429, 5xx, timeouts and dropped
connections are retried on the next healthy server; the failing server cools down (growing with its
consecutive failures, up to `cooldown_s`, or as long as its `Retry-After` asks, up to
`max_retry_after_s`): see `openai_fleet`. So a dead server's requests fail over to the others.
Authentication and unknown-model answers fail at once with a one-line error, since retrying cannot
fix them. A request that runs out of retries stops its whole call with one error counting the
failed requests, after the others still in flight are cancelled: nothing is returned partially.

LoRA adapters are loaded into every server through vLLM's runtime endpoint (`add_adapter`), and a
request for an adapter sends its name as the model.

With a local `tokenizer`, prompts are rendered here exactly as the local engines render them
and sent to /v1/completions (same text, same prefix-cache hits). Without one, /v1/chat/completions
is used; a pre-filled reply start is sent as a final assistant message with vLLM's
`continue_final_message`.

Keys are opt-in: a key is sent only when `api_key_env` names the environment variable holding it
(no implicit `$OPENAI_API_KEY`, so a shared recipe pointing at someone's server cannot collect the
user's key). It is read at request time and never stored on the engine, logged, or put in an error
message. A key (or user:password@ in a URL) is refused over plain HTTP to any host but this machine
unless `allow_insecure_key` says so. URLs are printed with their credentials removed.

A 200 reply whose body is not the shape the API promises (see `openai_reply`) is a one-line error
naming the status, the URL and the field, and is not retried.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from cai import chat
from cai.engines.base import ChatPrompt, ChoiceScores, Generation, SamplingSettings, normalise, truncate_at_stop
from cai.engines.openai_fleet import Fleet, Server, retry_after_s
from cai.engines.openai_reply import MalformedReply, generation_parts, match_choices, next_token_logprobs
from cai.errors import CaiError

log = logging.getLogger(__name__)
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


# -- URLs and keys ------------------------------------------------------------------------------------

_SECRET_PARAMETER = re.compile(r"key|token|secret|passw|sig|auth", re.IGNORECASE)


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:
        raise CaiError(f"'{redact_url(url)}' is not a valid URL", field="base_urls") from None


def redact_url(url: str) -> str:
    """`url` fit to print, log or record: no user:password@, no values of key- or token-like query
    parameters. Only the host, port and path are left to identify the server."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAMETER.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _without_credentials(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """(URL without user:password@, that user and password as basic auth). httpx logs request URLs
    at INFO level, so credentials travel as auth, never inside the URL it sees."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[-1]
    auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), auth


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OpenAISettings:
    base_urls: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    api_key_env: str | None = None  # the environment variable holding the key; none: send no key
    allow_insecure_key: bool = False  # send the key over plain HTTP to a host other than this machine
    served_model: str | None = None  # the name the server knows the model by; default: the model name
    tokenizer: str | None = None
    max_concurrency: int = 32
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 0.5
    cooldown_s: float = 30.0  # the longest a failing server is left alone (its cool-down doubles up to this)
    max_retry_after_s: float = 60.0  # the longest a server's Retry-After is honoured

    def __post_init__(self) -> None:
        for name in ("timeout_s", "backoff_s", "cooldown_s", "max_retry_after_s"):
            if not getattr(self, name) >= 0:
                raise CaiError(f"must be a number >= 0, not {getattr(self, name)!r}", field=f"engine.openai.{name}")
        for url in self.base_urls:
            parts = _split(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise CaiError(f"'{redact_url(url)}' is not an http(s) URL", field="base_urls")
            has_key = self.api_key_env or parts.username or parts.password
            if has_key and parts.scheme == "http" and not _is_loopback(parts.hostname) and not self.allow_insecure_key:
                raise CaiError(
                    f"refusing to send the API key in plain text to {redact_url(url)}: use https, or set "
                    "allow_insecure_key: true if this network is trusted",
                    field="base_urls",
                )


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, settings: OpenAISettings = OpenAISettings(), adapters: dict[str, str] | None = None):
        if not settings.base_urls:
            raise CaiError("needs at least one server URL", field="engine.openai.base_urls")
        if settings.api_key_env and not os.environ.get(settings.api_key_env):
            raise CaiError(f"${settings.api_key_env} is not set (it should hold the API key)", field="engine.openai.api_key_env")
        self.model = model
        self.settings = settings
        self.served_model = settings.served_model or model
        self.tokenizer = None
        if settings.tokenizer:
            from cai.loading import load_tokenizer

            self.tokenizer = load_tokenizer(settings.tokenizer)
        servers = [Server(*_without_credentials(u.rstrip("/")), shown=redact_url(u.rstrip("/"))) for u in settings.base_urls]
        self._fleet = Fleet(servers, backoff_s=settings.backoff_s, cooldown_s=settings.cooldown_s,
                            max_retry_after_s=settings.max_retry_after_s)
        self._adapters: dict[str, str] = {}  # name -> path, loaded into every server
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    # -- public interface ---------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        sampling: SamplingSettings,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
        bodies = [self._body(p, adapter, n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                             max_tokens=sampling.max_tokens, seed=seed, stop=list(sampling.stop) or None)
                  for p, seed in zip(prompts, seeds)]
        chat = self.tokenizer is None
        parts = self._run(bodies, lambda data: (generation_parts(data, chat=chat, n=sampling.n), usage_counts(data)[1]))
        return [self._generation(p, sampling, cached) for p, cached in parts]

    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores:
        if self.tokenizer is not None:
            extra = {"logprobs": 20}
        else:
            extra = {"logprobs": True, "top_logprobs": 20}
        match_choices({}, choices)  # choices that cannot be told apart fail before any request
        bodies = [self._body(p, adapter, max_tokens=1, temperature=0.0, **extra) for p in prompts]
        probs, mass, prompt_tokens, cached_tokens = [], [], [], []
        read = self._choice_logprobs(choices)
        for logprobs, (prompt_count, cached) in self._run(bodies, lambda data: (read(data), usage_counts(data))):
            p, m = normalise(logprobs)  # max-shifted: the logsumexp'd logprobs are <= ~0, so nothing overflows
            probs.append(p)
            mass.append(min(m, 1.0))  # float32 rounding on the server can sum a hair above 1
            prompt_tokens.append(prompt_count)
            cached_tokens.append(cached)
        return ChoiceScores(probs=probs, mass=mass, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens)

    def close(self) -> None:
        pass

    # -- request building -----------------------------------------------------------------------
    def _body(self, prompt: ChatPrompt, adapter: str | None, **params: Any) -> dict:
        if adapter is not None and adapter not in self._adapters:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise CaiError(f"adapter '{adapter}' was not loaded into the servers (loaded: {known}): load it with "
                           "add_adapter(name, path) first (the recipe's adapters do this)")
        body: dict[str, Any] = {"model": adapter or self.served_model}
        body.update({k: v for k, v in params.items() if v is not None})
        if self.tokenizer is not None:
            body["prompt"] = chat.render(self.tokenizer, prompt.messages, prompt.assistant_prefix)
            body["_path"] = "/completions"
        else:
            messages = [dict(m) for m in prompt.messages]
            if prompt.assistant_prefix:
                messages.append({"role": "assistant", "content": prompt.assistant_prefix})
                body.update(continue_final_message=True, add_generation_prompt=False)
            body["messages"] = messages
            body["_path"] = "/chat/completions"
        return body

    def _generation(self, parts: tuple[list[str], list[str | None], int, int], sampling: SamplingSettings,
                    cached_tokens: int = 0) -> Generation:
        """A Generation from `generation_parts` of a reply already checked for shape and types."""
        raw_texts, raw_reasons, prompt_tokens, completion_tokens = parts
        texts, reasons = [], []
        for text, reason in zip(raw_texts, raw_reasons):
            text, stopped = truncate_at_stop(text, sampling.stop)
            texts.append(text)
            reasons.append("stop" if stopped or reason == "stop" else "length")
        if self.tokenizer is not None:
            counts = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        else:  # the server reports one total for all n completions
            counts = [completion_tokens // max(1, len(texts))] * len(texts)
        return Generation(texts, prompt_tokens, counts, reasons, cached_tokens=cached_tokens)

    def _choice_logprobs(self, choices: Sequence[str]) -> Callable[[dict], list[float]]:
        """The reader of a one-token reply: each choice's log-probability from its top tokens."""
        chat = self.tokenizer is None
        return lambda data: match_choices(next_token_logprobs(data, chat=chat), choices)

    # -- transport --------------------------------------------------------------------------------
    def _run(self, bodies: list[dict], read: Callable[[dict], Any]) -> list:
        """Each body's reply, passed through `read` where the status and the URL are known, so a
        `MalformedReply` becomes a one-line CaiError naming them."""
        if not bodies:
            return []
        return asyncio.run(self._gather(bodies, read))

    async def _gather(self, bodies: list[dict], read: Callable[[dict], Any]) -> list:
        """All replies in order, or one CaiError: at the first request that fails (out of retries, or
        an answer retrying cannot fix), the others still running are cancelled and awaited, then the
        error says how many of the call's requests failed."""
        limit = asyncio.Semaphore(self.settings.max_concurrency)
        timeout = httpx.Timeout(self.settings.timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as client:
            async def one(body: dict) -> Any:
                async with limit:
                    return await self._post(client, body, read)

            tasks = [asyncio.create_task(one(b)) for b in bodies]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:  # also when this call itself is cancelled: no request is left running
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        failed = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        first = next((e for e in failed if isinstance(e, CaiError)), None)
        if first is None:  # not a user-fixable problem: a bug, with its traceback
            raise failed[0]
        cancelled = sum(t.cancelled() for t in tasks)
        counts = f"{len(failed)} of {len(tasks)} requests failed" + (f", {cancelled} cancelled" if cancelled else "")
        error = CaiError(f"{counts}; {first}")
        error.source, error.field = first.source, first.field
        raise error from None

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.settings.api_key_env) if self.settings.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _post(self, client: httpx.AsyncClient, body: dict, read: Callable[[dict], Any]) -> Any:
        """One request: each attempt goes to the server the fleet picks, so retries fail over."""
        body = dict(body)
        path = body.pop("_path")
        headers = self._headers()
        tried: list[Server] = []
        last_problem = ""
        for attempt in range(self.settings.max_retries + 1):
            server = await self._fleet.acquire()
            if server not in tried:
                tried.append(server)
            url, shown_base = server.base_url + path, server.shown
            shown = shown_base + path  # what messages and logs may print
            auth = None if headers else server.auth
            retry_after = None
            try:
                response = await client.post(url, json=body, headers=headers, auth=auth or httpx.USE_CLIENT_DEFAULT)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last_problem = f"{type(exc).__name__}"
            else:
                if response.status_code not in RETRYABLE:
                    self._fleet.succeeded(server)  # it answered: whatever it said, it is up
                if response.status_code == 200:
                    try:
                        return read(_reply(response, shown))
                    except MalformedReply as exc:  # not retried: the same answer would come back
                        raise CaiError(f"{shown} answered HTTP 200 with a malformed reply: {exc}") from None
                if response.status_code in (401, 403):
                    where = f"the API key in ${self.settings.api_key_env}" if self.settings.api_key_env else (
                        "no API key was sent: name its variable in engine.openai.api_key_env")
                    raise CaiError(f"authentication failed at {shown_base} (HTTP {response.status_code}): check {where}")
                if response.status_code == 404 or (response.status_code == 400 and "does not exist" in response.text):
                    raise CaiError(
                        f"model '{body['model']}' not found at {shown_base}: {_server_message(response)}",
                        field="engine.openai.served_model",
                    )
                if response.status_code not in RETRYABLE:
                    raise CaiError(f"{shown} answered HTTP {response.status_code}: {_server_message(response)}")
                last_problem = f"HTTP {response.status_code}"
                retry_after = retry_after_s(response.headers.get("retry-after"))
            cool = self._fleet.failed(server, retry_after)
            if attempt < self.settings.max_retries:
                log.warning("%s from %s (cooling down %.2f s); retry %d", last_problem, shown_base, cool, attempt + 1)
        if len(tried) > 1:
            last_problem += f" from {server.shown}"
        where = ", ".join(s.shown + path for s in tried)
        raise CaiError(f"{where} kept failing ({last_problem}) after {self.settings.max_retries} retries")

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter at `path` into every server under `name`; requests with
        `adapter=name` then ask for it as their model. `path` is read by the *servers*, not by this
        process: it must be a folder each server can read (a shared file system, or the same path
        on every server's machine) or a Hugging Face repo id they can download.

        Uses vLLM's runtime LoRA endpoint (`POST {base}/load_lora_adapter`), present when the server
        runs with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve ... --enable-lora`. A server
        already holding `name` from the same path (for instance from `--lora-modules name=path`)
        is fine; holding it from another path, it is unloaded and loaded again from `path`. A server
        without the endpoint, or refusing the adapter, is a one-line error saying how to start it."""
        with httpx.Client(timeout=httpx.Timeout(self.settings.timeout_s)) as client:
            for server in self._fleet.servers:
                self._load_adapter(client, server, name, path)
        self._adapters[name] = path

    def _load_adapter(self, client: httpx.Client, server: Server, name: str, path: str) -> None:
        body = {"lora_name": name, "lora_path": path}
        response = self._call(client, server, "/load_lora_adapter", body)
        if response.status_code == 400 and "already" in response.text and "loaded" in response.text:
            if self._served_adapter_root(client, server, name) == path:
                return
            self._call(client, server, "/unload_lora_adapter", {"lora_name": name})
            response = self._call(client, server, "/load_lora_adapter", body)
        if response.status_code == 200:
            return
        message = _server_message(response)
        if response.status_code in (401, 403):
            raise CaiError(f"authentication failed at {server.shown} (HTTP {response.status_code}) loading adapter '{name}'")
        if response.status_code == 404 and ("adapter" in message.lower() or "lora" in message.lower()):
            raise CaiError(f"{server.shown} could not find adapter '{name}' at {path}: {message} (the path is read "
                           "by the server, so it must exist on the server's machine)")
        if response.status_code in (404, 405):
            raise CaiError(
                f"{server.shown} cannot load LoRA adapters at run time (HTTP {response.status_code} from "
                f"{server.shown}/load_lora_adapter): start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve "
                f"... --enable-lora, or list the adapter when starting it with --enable-lora --lora-modules {name}={path}")
        raise CaiError(
            f"{server.shown} refused to load adapter '{name}' from {path} (HTTP {response.status_code}): {message}; "
            "it needs --enable-lora (and --max-lora-rank at least the adapter's rank), and the path must be readable "
            "by the server")

    def _served_adapter_root(self, client: httpx.Client, server: Server, name: str) -> str | None:
        """The path `server` says it loaded adapter `name` from (vLLM lists it as `root` in /models)."""
        try:
            data = self._call(client, server, "/models", None).json()
            cards = data.get("data") if isinstance(data, dict) else None
            return next((c.get("root") for c in cards or [] if isinstance(c, dict) and c.get("id") == name), None)
        except (ValueError, CaiError):
            return None

    def _call(self, client: httpx.Client, server: Server, path: str, body: dict | None) -> httpx.Response:
        """One management request (POST `body`, or GET without one) to this very server, retried
        after the fleet's cool-down for it (Retry-After included) while it is unreachable or busy;
        a server still failing is an error."""
        headers = self._headers()
        auth = None if headers else server.auth
        problem = ""
        for attempt in range(self.settings.max_retries + 1):
            try:
                if body is None:
                    response = client.get(server.base_url + path, headers=headers, auth=auth or httpx.USE_CLIENT_DEFAULT)
                else:
                    response = client.post(server.base_url + path, json=body, headers=headers,
                                           auth=auth or httpx.USE_CLIENT_DEFAULT)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem, retry_after = type(exc).__name__, None
            else:
                if response.status_code not in RETRYABLE:
                    self._fleet.succeeded(server)
                    return response
                problem, retry_after = f"HTTP {response.status_code}", retry_after_s(response.headers.get("retry-after"))
            wait = self._fleet.failed(server, retry_after)  # the same cool-down (and Retry-After) as requests
            if attempt < self.settings.max_retries:
                time.sleep(wait)
        raise CaiError(f"{server.shown}{path} kept failing ({problem}) after {self.settings.max_retries} retries")


def usage_counts(data: dict) -> tuple[int, int]:
    """(prompt tokens, of which served from the server's prefix cache) from a reply's `usage`:
    `usage.prompt_tokens_details.cached_tokens` (OpenAI; `vllm serve --enable-prompt-tokens-details`).
    Informational only, so a count a server leaves out or sends oddly reads as 0 instead of
    stopping a run (`generation_parts` checks the counts labels depend on)."""

    def count(where: Any, key: str) -> int:
        value = where.get(key) if isinstance(where, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    usage = data.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    return count(usage, "prompt_tokens"), count(details, "cached_tokens")


def _reply(response: httpx.Response, shown_url: str) -> dict:
    """A 200 answer's JSON object with a list of choices; anything else (an HTML error page from a
    proxy, a truncated body, a different API) is a one-line error showing what came back."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        what = "not a JSON object" if not isinstance(data, dict) else "a JSON object without 'choices'"
        start = response.content[:200].decode("utf-8", errors="replace")
        raise CaiError(f"{shown_url} answered HTTP {response.status_code} with a body that is {what}: {start!r}")
    return data


def _server_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = response.text
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else data.get("message") or error
    else:
        message = data
    return str(message).strip().splitlines()[0][:300] if message and str(message).strip() else "(no message)"
