"""`cai sample` knows its policy by the adapter's content, not its folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cai.engines.base import Generation
from cai.errors import CaiError
from cai.prompt_sets import Prompt
from cai.sampling import SampleSettings, run_sampling


class SeedEcho:
    """An engine whose answers are the request seeds and the adapter's weights file."""

    model, name = "fake-model", "fake"

    def __init__(self):
        self.requests = 0

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        self.requests += len(prompts)
        return [Generation([f"seed {s}.{i}" for i in range(sampling.n)], 3, [2] * sampling.n, ["stop"] * sampling.n)
                for s in seeds]


PROMPTS = [Prompt(f"p{i}", ({"role": "user", "content": f"question {i}"},)) for i in range(3)]


def adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def responses(folder: Path) -> list[list[str]]:
    return [json.loads(line)["responses"] for line in (folder / "responses.jsonl").read_text().splitlines()]


def test_the_same_adapter_in_another_folder_draws_the_same_samples(tmp_path):
    first = adapter(tmp_path / "run-a" / "sft" / "adapter", b"weights")
    second = tmp_path / "run-b" / "sft" / "adapter"
    shutil.copytree(first, second)
    run_sampling(SeedEcho(), PROMPTS, tmp_path / "a", SampleSettings(), adapter="sft", adapter_path=str(first))
    run_sampling(SeedEcho(), PROMPTS, tmp_path / "b", SampleSettings(), adapter="sft", adapter_path=str(second))
    assert responses(tmp_path / "a") == responses(tmp_path / "b")
    rows = [json.loads(line) for line in (tmp_path / "b" / "responses.jsonl").read_text().splitlines()]
    assert rows[0]["provenance"]["adapter"] == str(second)  # where it came from stays traceable


def test_a_retrained_adapter_in_the_same_folder_is_not_resumed_from_the_old_ones_rows(tmp_path):
    path = adapter(tmp_path / "sft" / "adapter", b"old weights")
    out = tmp_path / "samples"
    run_sampling(SeedEcho(), PROMPTS, out, SampleSettings(), adapter="sft", adapter_path=str(path))
    (path / "adapter_model.safetensors").write_bytes(b"new weights")
    engine = SeedEcho()
    with pytest.raises(CaiError):  # another policy: the folder holds a different run
        run_sampling(engine, PROMPTS, out, SampleSettings(), adapter="sft", adapter_path=str(path))
    assert engine.requests == 0
    run_sampling(engine, PROMPTS, out, SampleSettings(), adapter="sft", adapter_path=str(path), overwrite=True)
    assert engine.requests == len(PROMPTS)  # sampled again, none resumed
