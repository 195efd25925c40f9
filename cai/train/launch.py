"""One training process of a launched stage (see cai/train/distributed.py).

    torchrun --nproc_per_node 2 -m cai.train.launch runs/x/dpo/launch.json

Reads the call the driver wrote and makes it on every rank. A user error (`CaiError`) prints one
line and exits 2, like the CLI; the driver then stops the run. Only the main rank writes progress
lines into the run's log (all ranks draw nothing else: the trainers' own bars check the rank).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cai import progress
from cai.errors import CaiError
from cai.train.distributed import decode, resolve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("run_log") and os.environ.get("RANK", "0") == "0":
        progress.set_log_file(Path(spec["run_log"]))
    try:
        resolve(spec["target"])(**decode(spec["kwargs"]))
    except CaiError as exc:
        print(f"error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
