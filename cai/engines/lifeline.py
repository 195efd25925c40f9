"""Engine processes die with the process that started them.

    with children_die_with_parent():
        llm = vllm.LLM(...)   # its EngineCore child now dies when this process dies

vLLM runs its scheduler and model (`EngineCore`) in a child process. When `cai` itself is killed
with SIGKILL (`kill -9`, the OOM killer, a scheduler's hard time limit), no Python code runs to
stop that child: it lives on as an orphan holding gigabytes of memory and every core. Linux can
tie a child's life to its parent's: `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the child makes the
kernel kill it when its parent goes. SIGKILL rather than SIGTERM because EngineCore catches
SIGTERM to drain its requests, and there is nobody left to send the results to.

vLLM creates EngineCore with `multiprocessing.get_context(method).Process(...)` (spawn on CPU,
fork or spawn on CUDA). While this context manager is active, those contexts hand out Process
classes whose `run()` sets the signal first thing in the child, so vLLM's own code is not
patched. On a CPU, cai runs the engine inside this process instead (`cai.engines.vllm_engine`:
two spawned interpreters cost ~17 s of start-up there), so this matters on CUDA and wherever
`VLLM_ENABLE_V1_MULTIPROCESSING=1` is set.

Linux only (elsewhere a no-op). The signal fires when the creating *thread* exits, so it is set
only for processes started from the main thread. forkserver children are left alone: their
parent is the fork server, not this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.context as mp_context
import os
import signal
import sys
import threading
from typing import Iterator

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
MAIN_GUARD_HINT = (
    "vLLM starts its engine in a new process, which re-imports your script: put the code that starts "
    "the engine under `if __name__ == \"__main__\":`"
)


def set_parent_death_signal(signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies. False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies (0: none)."""
    if not sys.platform.startswith("linux"):
        return 0
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


class _DiesWithParent:
    def run(self) -> None:
        # The parent may have died between fork and prctl: then no signal will ever come.
        if set_parent_death_signal() and os.getppid() != self._parent_pid:  # type: ignore[attr-defined]
            os._exit(1)
        super().run()  # type: ignore[misc]


# Module-level classes, so a spawned child can unpickle its Process object.
class SpawnProcessDyingWithParent(_DiesWithParent, mp_context.SpawnProcess):
    pass


if sys.platform != "win32":
    class ForkProcessDyingWithParent(_DiesWithParent, mp_context.ForkProcess):
        pass

    _PROCESS_CLASSES = {"spawn": SpawnProcessDyingWithParent, "fork": ForkProcessDyingWithParent}
else:  # pragma: no cover
    _PROCESS_CLASSES = {}


@contextlib.contextmanager
def children_die_with_parent() -> Iterator[None]:
    """While active, processes started via multiprocessing's spawn/fork contexts die with this one."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for method, cls in _PROCESS_CLASSES.items():
        context = multiprocessing.get_context(method)
        saved[method] = (context, context.__dict__.get("Process"))
        context.Process = cls  # type: ignore[misc]
    try:
        yield
    finally:
        for context, previous in saved.values():
            if previous is None:
                del context.Process
            else:
                context.Process = previous
