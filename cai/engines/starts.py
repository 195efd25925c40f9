"""Every inference engine started in this process, with how long its start took.

`cai run` subtracts these from a stage's wall time (`engine_start_seconds` in done.json), so a
stage's own work and the fixed cost of starting vLLM (20-40 s on a CPU) are measured apart.
Kept in its own module so importing it does not import any engine.
"""

engine_starts: list[dict] = []  # {"kind", "model", "seconds"}, in start order
