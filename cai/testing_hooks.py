"""Deterministic kill points for the crash-safety tests.

    CAI_TEST_KILL_AT=worklog.append:3 CAI_TEST_KILL_MARKER=/tmp/m python -c "..."   # dies after the 3rd append

A resume-after-SIGKILL test that kills its child after a sleep or a random delay is a race: on a
fast machine the child has finished before the kill, on a loaded one nothing was written yet,
and either way the test can pass without testing a resume. Instead cai calls `checkpoint(name)`
at the moments worth dying at (after a work-log append is on disk, ...). When the environment
variable `CAI_TEST_KILL_AT` is `<name>:<n>` and this is the n-th call of that point in this
process, the process writes the marker file named by `CAI_TEST_KILL_MARKER` (if set) and sends
itself SIGKILL: no cleanup, no atexit, exactly what a power cut or the OOM killer does. The test
then checks the return code is -9 and the marker exists, so it cannot pass without a kill.

Unset (every real run), a checkpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "CAI_TEST_KILL_AT"
MARKER = "CAI_TEST_KILL_MARKER"
ONCE = "CAI_TEST_KILL_ONCE"  # set: no kill once the marker exists, across processes

_calls: dict[str, int] = {}


def checkpoint(name: str) -> None:
    """A named point a test may kill this process at; a no-op unless `CAI_TEST_KILL_AT` names it."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if point != name:
        return
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{KILL_AT}={spec!r} must look like <point>:<n> with n >= 1")
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] != int(count):
        return
    marker = os.environ.get(MARKER)
    if marker and os.environ.get(ONCE) and os.path.exists(marker):
        return  # killed once already (a restarted Ray actor is a new process with fresh counts)
    if marker:
        with open(marker, "w", encoding="utf-8") as handle:
            handle.write(f"{spec} pid={os.getpid()}\n")
            handle.flush()
            os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
