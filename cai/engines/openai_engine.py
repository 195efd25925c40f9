"""The OpenAI-compatible engine: a fleet of `vllm serve` (or llama.cpp, TGI...) servers.

Requests go out concurrently (bounded by `max_concurrency`) and round-robin over `base_urls`,
so several servers share a batch. 429, 5xx, timeouts and dropped connections are retried with
exponential backoff and jitter; authentication and unknown-model answers fail at once with a
one-line error, since retrying cannot fix them.

With a local `tokenizer`, prompts are rendered here exactly as the local engines render them
and sent to /v1/completions (same text, same prefix-cache hits). Without one, /v1/chat/completions
is used; a pre-filled reply start is sent as a final assistant message with vLLM's
`continue_final_message`.

The API key is read from the environment variable named by `api_key_env` at request time and
is never stored on the engine, logged, or put in an error message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from cai import chat
from cai.engines.base import ChatPrompt, ChoiceScores, Generation, SamplingSettings, normalise, truncate_at_stop
from cai.errors import CaiError

log = logging.getLogger(__name__)
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class OpenAISettings:
    base_urls: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    api_key_env: str = "OPENAI_API_KEY"
    served_model: str | None = None  # the name the server knows the model by; default: the model name
    tokenizer: str | None = None
    max_concurrency: int = 32
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 0.5


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, settings: OpenAISettings = OpenAISettings()):
        if not settings.base_urls:
            raise CaiError("needs at least one server URL", field="engine.openai.base_urls")
        self.model = model
        self.settings = settings
        self.served_model = settings.served_model or model
        self.tokenizer = None
        if settings.tokenizer:
            from cai.loading import load_tokenizer

            self.tokenizer = load_tokenizer(settings.tokenizer)
        self._urls = itertools.cycle([u.rstrip("/") for u in settings.base_urls])

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
        responses = self._run(bodies)
        return [self._generation(r, sampling) for r in responses]

    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores:
        if self.tokenizer is not None:
            extra = {"logprobs": 20}
        else:
            extra = {"logprobs": True, "top_logprobs": 20}
        bodies = [self._body(p, adapter, max_tokens=1, temperature=0.0, **extra) for p in prompts]
        probs, mass = [], []
        for response in self._run(bodies):
            p, m = normalise(self._choice_logprobs(response, choices))
            probs.append(p)
            mass.append(m)
        return ChoiceScores(probs=probs, mass=mass)

    def close(self) -> None:
        pass

    # -- request building -----------------------------------------------------------------------
    def _body(self, prompt: ChatPrompt, adapter: str | None, **params: Any) -> dict:
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

    def _generation(self, response: dict, sampling: SamplingSettings) -> Generation:
        choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
        texts, reasons = [], []
        for choice in choices:
            text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content") or ""
            text, stopped = truncate_at_stop(text, sampling.stop)
            texts.append(text)
            reasons.append("stop" if stopped or choice.get("finish_reason") == "stop" else "length")
        usage = response.get("usage") or {}
        if self.tokenizer is not None:
            counts = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        else:  # the server reports one total for all n completions
            total = int(usage.get("completion_tokens", 0))
            counts = [total // max(1, len(texts))] * len(texts)
        return Generation(texts, int(usage.get("prompt_tokens", 0)), counts, reasons)

    @staticmethod
    def _choice_logprobs(response: dict, choices: Sequence[str]) -> list[float]:
        choice = (response.get("choices") or [{}])[0]
        top: dict[str, float] = {}
        logprobs = choice.get("logprobs") or {}
        if "top_logprobs" in logprobs and isinstance(logprobs["top_logprobs"], list):  # completions API
            top = dict((logprobs["top_logprobs"] or [{}])[0] or {})
        elif isinstance(logprobs.get("content"), list) and logprobs["content"]:  # chat API
            top = {e["token"]: e["logprob"] for e in logprobs["content"][0].get("top_logprobs", [])}
        result = []
        for wanted in choices:
            # " A" and "A" are different tokens that mean the same choice: add their probabilities.
            matches = [lp for token, lp in top.items() if token.strip() == wanted]
            result.append(math.log(sum(math.exp(lp) for lp in matches)) if matches else -math.inf)
        return result

    # -- transport --------------------------------------------------------------------------------
    def _run(self, bodies: list[dict]) -> list[dict]:
        if not bodies:
            return []
        return asyncio.run(self._gather(bodies))

    async def _gather(self, bodies: list[dict]) -> list[dict]:
        limit = asyncio.Semaphore(self.settings.max_concurrency)
        timeout = httpx.Timeout(self.settings.timeout_s)
        async with httpx.AsyncClient(timeout=timeout) as client:
            async def one(body: dict) -> dict:
                async with limit:
                    return await self._post(client, next(self._urls), body)

            return await asyncio.gather(*(one(b) for b in bodies))

    async def _post(self, client: httpx.AsyncClient, base_url: str, body: dict) -> dict:
        body = dict(body)
        url = base_url + body.pop("_path")
        headers = {}
        key = os.environ.get(self.settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_problem = ""
        for attempt in range(self.settings.max_retries + 1):
            try:
                response = await client.post(url, json=body, headers=headers)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last_problem = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    return response.json()
                if response.status_code in (401, 403):
                    raise CaiError(
                        f"authentication failed at {base_url} (HTTP {response.status_code}): "
                        f"check the API key in ${self.settings.api_key_env}"
                    )
                if response.status_code == 404 or (response.status_code == 400 and "does not exist" in response.text):
                    raise CaiError(
                        f"model '{body['model']}' not found at {base_url}: {_server_message(response)}",
                        field="engine.openai.served_model",
                    )
                if response.status_code not in RETRYABLE:
                    raise CaiError(f"{url} answered HTTP {response.status_code}: {_server_message(response)}")
                last_problem = f"HTTP {response.status_code}"
            if attempt < self.settings.max_retries:
                delay = self.settings.backoff_s * (2**attempt) * (0.5 + random.random())
                log.warning("%s from %s; retry %d in %.1f s", last_problem, base_url, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise CaiError(f"{url} kept failing ({last_problem}) after {self.settings.max_retries} retries")


def _server_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        message = (data.get("error") or {}).get("message") if isinstance(data.get("error"), dict) else data.get("message") or data.get("error")
    except ValueError:
        message = response.text
    return str(message or "").strip().splitlines()[0][:300] if message else "(no message)"
