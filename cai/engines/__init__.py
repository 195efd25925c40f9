"""Engine selection: one engine per model per process, shared by every stage of a run.

    from cai.engines import EngineSettings, get_engine
    engine = get_engine("smollm2-135m-instruct", EngineSettings(kind="auto"))

`auto` picks vLLM when it imports and starts, otherwise the transformers engine, and logs why.
vLLM start-up costs 20-120 s on a CPU, so engines are cached by (kind, model): generation and
labelling with the same model in one run reuse the same engine. Call `close_all()` to free them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from cai.engines.base import ChatPrompt, ChoiceScores, Engine, Generation, SamplingSettings
from cai.engines.openai_engine import OpenAISettings
from cai.errors import CaiError

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "vllm", "hf", "openai"]

__all__ = [
    "ChatPrompt",
    "ChoiceScores",
    "Engine",
    "EngineSettings",
    "Generation",
    "OpenAISettings",
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
    openai: OpenAISettings = field(default_factory=OpenAISettings)

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "vllm", "hf", "openai"):
            raise CaiError(f"unknown engine '{self.kind}' (choose auto, vllm, hf or openai)", field="engine.kind")


_ENGINES: dict[tuple, Engine] = {}


def get_engine(model: str, settings: EngineSettings = EngineSettings(), adapters: dict[str, str] | None = None) -> Engine:
    """The engine for `model`, started once per process. `adapters` maps names to LoRA folders."""
    kind = settings.kind
    if kind == "auto":
        kind = _auto_kind()
    key = (kind, model, settings.openai if kind == "openai" else None)
    engine = _ENGINES.get(key)
    if engine is None:
        if kind == "vllm" and settings.kind == "auto":
            try:
                engine = _start(kind, model, settings, adapters)
            except CaiError as exc:
                log.warning("engine auto: vLLM did not start (%s); using transformers", exc)
                kind, key = "hf", ("hf", model, None)
                engine = _ENGINES.get(key) or _start("hf", model, settings, adapters)
        else:
            engine = _start(kind, model, settings, adapters)
        _ENGINES[key] = engine
    elif adapters:
        for name, path in adapters.items():
            engine.add_adapter(name, path)  # type: ignore[attr-defined]
    return engine


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
        )
    from cai.engines.openai_engine import OpenAIEngine

    return OpenAIEngine(model, settings.openai)


def close_all() -> None:
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()
