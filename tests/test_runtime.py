import os

import pytest
import torch

from cai import runtime


def test_cpu_training_defaults_turn_off_bf16_and_checkpointing():
    overrides = runtime.training_overrides("cpu")
    assert overrides["bf16"] is False and overrides["fp16"] is False
    assert overrides["gradient_checkpointing"] is False
    assert overrides["use_cpu"] is True


def test_overrides_are_accepted_by_trl_configs(tmp_path):
    from trl import DPOConfig, SFTConfig

    for config_class in (SFTConfig, DPOConfig):
        config = config_class(output_dir=str(tmp_path), **runtime.training_overrides("cpu"))
        assert config.bf16 is False and config.gradient_checkpointing is False


def test_threads_setting_applies(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.apply(runtime.RuntimeSettings(device="cpu", threads=1)) == "cpu"
        assert torch.get_num_threads() == 1
        runtime.apply(runtime.RuntimeSettings(device="cpu", threads=0))
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_negative_threads_rejected():
    with pytest.raises(ValueError):
        runtime.RuntimeSettings(threads=-1)


def test_cpu_dtype_is_fp32():
    assert runtime.model_dtype("cpu") == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_request_without_gpu_is_a_clear_error():
    from cai.errors import CaiError

    with pytest.raises(CaiError, match="runtime.device"):
        runtime.resolve_device("cuda")
