"""Engine selection: one engine per model per process, shared by every stage of a run.

    from cai.engines import EngineSettings, get_engine
    engine = get_engine("smollm2-135m-instruct", EngineSettings(kind="auto"))

`auto` picks vLLM when it imports and starts, otherwise the transformers engine, and logs why.
vLLM start-up costs 20-120 s on a CPU, so engines are cached: generation and labelling with the
same model in one run reuse the same engine. The cache key is the model, the engine kind and
every setting that kind uses (trust_remote_code, batch size, context length, KV cache, LoRA
slots, server settings...), so a request with other settings gets its own engine instead of
silently sharing the first one. `threads` only changes speed and is process-wide, so it is not
part of the key. LoRA adapters are not either: they attach to the shared engine by name (a name
given again with another folder replaces the old adapter), but a request with adapters needs an
engine with LoRA support, which is part of the key. Call `close_all()` to free the engines.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Literal

from cai.engines.base import ChatPrompt, ChoiceScores, Engine, Generation, SamplingSettings
from cai.engines.openai_engine import OpenAISettings
from cai.engines.ray_engine import RaySettings
from cai.engines.starts import engine_starts
from cai.errors import CaiError

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "vllm", "hf", "openai", "ray"]

__all__ = [
    "ChatPrompt",
    "ChoiceScores",
    "Engine",
    "EngineSettings",
    "Generation",
    "OpenAISettings",
    "RaySettings",
    "SamplingSettings",
    "close_all",
    "get_engine",
]


@dataclass(frozen=True)
class EngineSettings:
    kind: EngineKind = "auto"
    threads: int = 0
    batch_size: int = 16  # hf engine
    max_model_len: int = 4096  # vllm engine
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: int = 2  # vllm on CPU
    trust_remote_code: bool = False
    enable_lora: bool = False  # vllm: reserve LoRA slots so adapters can be attached later
    max_lora_rank: int = 64
    merge_adapters: bool = False  # vllm: serve adapters as merged weights swapped in place (cai.merge)
    tensor_parallel_size: int = 1  # vllm on CUDA: GPUs per engine (with kind ray: set gpus_per_actor to match)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    ray: RaySettings = field(default_factory=RaySettings)  # kind ray: actors each owning a `ray.engine` engine

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise CaiError("must be >= 1", field="engine.tensor_parallel_size")
        if self.kind == "ray" and self.tensor_parallel_size > max(1, self.ray.gpus_per_actor):
            raise CaiError(f"each Ray actor's engine spans {self.tensor_parallel_size} GPUs: set engine.ray.gpus_per_actor "
                           f"to {self.tensor_parallel_size}", field="engine.tensor_parallel_size")
        if self.kind not in ("auto", "vllm", "hf", "openai", "ray"):
            raise CaiError(f"unknown engine '{self.kind}' (choose auto, vllm, hf, openai or ray)", field="engine.kind")


_ENGINES: dict[tuple, Engine] = {}
_FELL_BACK: set[tuple] = set()  # `auto` keys whose vLLM start failed: they use transformers

# Settings each engine kind ignores: leaving them out of its cache key avoids starting a second,
# identical engine. Every other field (including any added later) is part of the key.
_NOT_USED = {
    "hf": {"max_model_len", "gpu_memory_utilization", "kv_cache_gib", "enable_lora", "max_lora_rank", "merge_adapters",
           "tensor_parallel_size", "openai", "ray"},
    "vllm": {"batch_size", "openai", "ray"},
    "openai": {"batch_size", "max_model_len", "gpu_memory_utilization", "kv_cache_gib", "trust_remote_code",
               "enable_lora", "max_lora_rank", "merge_adapters", "tensor_parallel_size", "ray"},
    "ray": {"openai"},  # the actors' engine uses every other setting
}
_NOT_BEHAVIOUR = {"kind", "threads"}  # the resolved kind is keyed separately; threads only change speed


def cache_key(kind: str, model: str, settings: EngineSettings, adapters: dict[str, str] | None = None) -> tuple:
    """What makes two engine requests interchangeable: model, kind and every setting the kind uses."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.name not in _NOT_BEHAVIOUR and f.name not in _NOT_USED[kind]}
    if kind in ("vllm", "ray"):  # adapters need an engine started with LoRA slots (unless they are merged)
        values["enable_lora"] = (settings.enable_lora or bool(adapters)) and not settings.merge_adapters
        if not values["enable_lora"]:
            values.pop("max_lora_rank")
    return (kind, model, tuple(sorted(values.items())))


def get_engine(model: str, settings: EngineSettings = EngineSettings(), adapters: dict[str, str] | None = None) -> Engine:
    """The engine for `model`, started once per process for the same settings. `adapters` maps
    names to LoRA folders."""
    _refuse_in_bootstrapping_child()
    kind = settings.kind
    if kind == "auto":
        kind = _auto_kind()
    key = cache_key(kind, model, settings, adapters)
    auto_vllm = kind == "vllm" and settings.kind == "auto"
    if auto_vllm and key in _FELL_BACK:  # vLLM already failed to start with these settings
        return get_engine(model, dataclasses.replace(settings, kind="hf"), adapters)
    engine = _ENGINES.get(key)
    if engine is not None:
        _attach(engine, adapters)
        return engine
    began = time.perf_counter()
    try:
        engine = _start(kind, model, settings, adapters)
    except CaiError as exc:
        if not auto_vllm:
            raise
        log.warning("engine auto: vLLM did not start (%s); using transformers", exc)
        _FELL_BACK.add(key)
        return get_engine(model, dataclasses.replace(settings, kind="hf"), adapters)
    _ENGINES[key] = engine
    engine_starts.append({"kind": kind, "model": model, "seconds": time.perf_counter() - began})
    return engine


def _attach(engine: Engine, adapters: dict[str, str] | None) -> None:
    for name, path in (adapters or {}).items():
        engine.add_adapter(name, path)  # type: ignore[attr-defined]


def _refuse_in_bootstrapping_child() -> None:
    """A process started with `spawn` (vLLM's EngineCore) first re-imports the main script. If that
    script starts an engine at the top level, the child would start a second engine (or, with
    `auto`, fall back to transformers and run the whole script again). Stop it with the fix."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        from cai.engines.lifeline import MAIN_GUARD_HINT

        raise CaiError(f"an engine was requested while this process was starting up as a child process: {MAIN_GUARD_HINT}")


def _auto_kind() -> str:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # broken installs raise more than ImportError
        log.info("engine auto: vLLM not importable (%s); using transformers", str(exc).splitlines()[0] if str(exc) else exc)
        return "hf"
    log.info("engine auto: using vLLM")
    return "vllm"


def _start(kind: str, model: str, settings: EngineSettings, adapters: dict[str, str] | None) -> Engine:
    if kind == "hf":
        from cai.engines.hf import HFEngine

        return HFEngine(
            model,
            batch_size=settings.batch_size,
            threads=settings.threads,
            trust_remote_code=settings.trust_remote_code,
            adapters=adapters,
        )
    if kind == "vllm":
        from cai.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model,
            threads=settings.threads,
            max_model_len=settings.max_model_len,
            trust_remote_code=settings.trust_remote_code,
            adapters=adapters,
            enable_lora=settings.enable_lora,
            max_lora_rank=settings.max_lora_rank,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_gib=settings.kv_cache_gib,
            merge_adapters=settings.merge_adapters,
            tensor_parallel_size=settings.tensor_parallel_size,
        )
    if kind == "ray":
        from cai.engines.ray_engine import RayEngine

        return RayEngine(model, settings, adapters)
    from cai.engines.openai_engine import OpenAIEngine

    return OpenAIEngine(model, settings.openai, adapters=adapters)


def close_all() -> None:
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()
    _FELL_BACK.clear()
