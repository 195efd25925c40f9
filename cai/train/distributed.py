"""Training stages on several processes: `cai run` launches each one through torchrun or accelerate.

    # recipe
    distributed: {processes: 2}                                           # torchrun, DDP (gloo on CPU, nccl on GPUs)
    distributed: {processes: 4, accelerate_config: recipes/accelerate-zero2.yaml}   # accelerate + DeepSpeed ZeRO-2

    cai run recipes/scale-out.yaml      # never wrapped in a launcher: cai starts one per training stage

Why the driver launches each stage instead of the user wrapping the whole recipe in a launcher:
generation stages (critique, sample, label, eval) must run once, on the driver's engine, while a
training stage must run once per process. So `cai run` stays one process holding the run lock and
the work logs; for sft, rm, dpo, grpo, rloo (and the trainers in this package) it writes the
call (`launch.json` in the stage folder: function and settings), starts `torchrun` or
`accelerate launch` on `python -m cai.train.launch launch.json`, and waits. Every rank trains;
only the main one writes the adapter, metrics and cards (the trainers check
`trainer.is_world_process_zero()`); the driver then writes `done.json` as for any stage.

Launchers: torchrun (the default without an accelerate config) starts real processes on CPU and
GPU alike; `accelerate launch` is used when an accelerate config is named (DeepSpeed ZeRO-2/3 or
FSDP, as shipped in `recipes/`). On a CPU, `accelerate launch --cpu --num_processes 2` starts one
process (multi-CPU needs MPI), so CPU runs use torchrun. PPO is cai's own single-process loop and
always runs in the driver. One machine per run: for several machines, start the per-stage
commands (`cai sft`, `cai dpo`, ...) under your launcher on each machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cai.errors import CaiError

SPEC_NAME = "launch.json"


@dataclass(frozen=True)
class DistributedSettings:
    processes: int = 1  # training processes on this machine (one per GPU); 1 = train in the driver
    launcher: Literal["auto", "torchrun", "accelerate"] = "auto"  # auto: accelerate with a config, else torchrun
    accelerate_config: str | None = None  # an accelerate config file (DeepSpeed / FSDP), e.g. recipes/accelerate-zero2.yaml
    machines: int = 1
    main_process_port: int = 0  # 0: a free port

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise CaiError("must be >= 1", field="distributed.processes")
        if self.machines != 1:
            raise CaiError("cai run launches training on this machine only; for several machines run the stage commands "
                           "(cai sft, cai dpo, ...) under your launcher on each", field="distributed.machines")
        if self.launcher == "torchrun" and self.accelerate_config:
            raise CaiError("an accelerate config needs launcher accelerate (or auto)", field="distributed.launcher")

    @property
    def enabled(self) -> bool:
        return self.processes > 1 or self.accelerate_config is not None

    def chosen_launcher(self) -> str:
        return self.launcher if self.launcher != "auto" else ("accelerate" if self.accelerate_config else "torchrun")


# -- the call, as JSON --------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """Arguments of a training function as JSON: settings dataclasses keep their class name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": encode(dataclasses.asdict(value))}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot pass {type(value).__name__} to a launched training process")


def decode(value: Any) -> Any:
    from cai.config import from_dict

    if isinstance(value, dict) and "__dataclass__" in value:
        module, name = value["__dataclass__"].split(":")
        return from_dict(getattr(importlib.import_module(module), name), value["fields"])
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    return value


def resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# -- the launch ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(settings: DistributedSettings, spec: Path) -> list[str]:
    port = str(settings.main_process_port or _free_port())
    entry = ["-m", "cai.train.launch", str(spec)]
    if settings.chosen_launcher() == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(settings.processes),
                "--master_addr", "127.0.0.1", "--master_port", port, *entry]
    config = ["--config_file", settings.accelerate_config] if settings.accelerate_config else []
    return [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", str(settings.processes),
            "--num_machines", "1", "--main_process_port", port, *entry]


def launch(distributed: DistributedSettings, target: str, log, **kwargs) -> dict:
    """Run `target(**kwargs)` (a cai training function that writes `metrics.json` into its
    `out_dir` argument) under the launcher, one process per `distributed.processes`; returns the main
    process's metrics."""
    from cai import progress

    out_dir = Path(kwargs["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / SPEC_NAME
    metrics_file = out_dir / "metrics.json"
    metrics_file.unlink(missing_ok=True)  # what the driver reads back must come from this launch
    spec.write_text(json.dumps({"target": target, "kwargs": encode(kwargs), "run_log": progress.current_log_file()}, indent=2))
    _free_accelerators()
    cmd = command(distributed, spec)
    log(f"[launch] {distributed.processes} processes: {' '.join(cmd[1:])}")
    env = dict(os.environ)
    # torchrun sets 1 thread per process when unset; give each rank its share of the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // distributed.processes)))
    completed = subprocess.run(cmd, env=env)
    if completed.returncode != 0 or not metrics_file.exists():
        raise CaiError(f"the {distributed.chosen_launcher()} launch of {target} exited with code {completed.returncode} "
                       "(its processes' errors are printed above)", source=str(spec))
    return json.loads(metrics_file.read_text())


def _free_accelerators() -> None:
    """Hand the driver's engines' GPU memory back before the training processes start."""
    import gc

    import torch

    if torch.cuda.is_available():
        from cai.engines import close_all

        close_all()
        gc.collect()
        torch.cuda.empty_cache()
