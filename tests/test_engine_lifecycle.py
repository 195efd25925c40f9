"""Engine life cycle: which requests share an engine, what a failed start says, and that an
engine's child processes die with the process that started them.

The default tests use a stand-in `vllm` module (no vLLM start-up). The `slow` test starts the real
vLLM engine on the builtin SmolLM2 under `cai critique`, kills it with SIGKILL and checks that
no process it started survives.
"""

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest

import cai.engines as engines
from cai.engines import EngineSettings, get_engine
from cai.engines.lifeline import parent_death_signal
from cai.errors import CaiError

BOOTSTRAP_TEXT = """
        An attempt has been made to start a new process before the
        current process has finished its bootstrapping phase.

        This probably means that you are not using fork to start your
        child processes and you have forgotten to use the proper idiom
        in the main module:"""


def _report_death_signal(queue):
    queue.put(parent_death_signal())


@pytest.fixture
def fake_vllm(monkeypatch, tiny_tokenizer_dir):
    """A `vllm` module whose LLM records its arguments, can be made to fail, and starts a spawn
    child the way vLLM starts EngineCore (reporting the child's parent-death signal)."""
    from transformers import AutoTokenizer

    from cai.engines import vllm_engine

    module = types.ModuleType("vllm")
    module.calls, module.fail, module.child_death_signals = [], None, []

    class LLM:
        def __init__(self, **kwargs):
            module.calls.append(kwargs)
            if module.fail is not None:
                raise module.fail
            if module.spawn_child:
                context = multiprocessing.get_context("spawn")
                queue = context.Queue()
                child = context.Process(target=_report_death_signal, args=(queue,))
                child.start()
                module.child_death_signals.append(queue.get(timeout=60))
                child.join()

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)

    module.LLM, module.spawn_child = LLM, False
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_engine, "configure_environment", lambda *a, **k: None)
    monkeypatch.setattr(vllm_engine, "_cuda_available", lambda: False)
    monkeypatch.setattr(engines, "_ENGINES", {})
    monkeypatch.setattr(engines, "_FELL_BACK", set())
    return module


# -- the engine cache (issue 19.9) ------------------------------------------------------------------


def test_engine_cache_keys_on_behaviour_settings(fake_vllm, tiny_causal_lm_dir, tmp_path):
    model = str(tiny_causal_lm_dir)
    first = get_engine(model, EngineSettings(kind="vllm"))
    assert get_engine(model, EngineSettings(kind="vllm", threads=1, batch_size=3)) is first  # speed-only / unused
    assert len(fake_vllm.calls) == 1
    trusting = get_engine(model, EngineSettings(kind="vllm", trust_remote_code=True))
    longer = get_engine(model, EngineSettings(kind="vllm", max_model_len=1024))
    (tmp_path / "sft").mkdir()
    with_lora = get_engine(model, EngineSettings(kind="vllm"), adapters={"sft": str(tmp_path / "sft")})
    assert len({id(e) for e in (first, trusting, longer, with_lora)}) == 4
    assert [c["trust_remote_code"] for c in fake_vllm.calls] == [False, True, False, False]
    assert [c["max_model_len"] for c in fake_vllm.calls] == [4096, 4096, 1024, 4096]
    assert [c.get("enable_lora", False) for c in fake_vllm.calls] == [False, False, False, True]
    assert with_lora._adapters["sft"][1] == str(tmp_path / "sft")
    # An engine with LoRA slots takes later adapters; asking for them again reuses it.
    (tmp_path / "dpo").mkdir()
    assert get_engine(model, EngineSettings(kind="vllm", enable_lora=True), adapters={"dpo": str(tmp_path / "dpo")}) is with_lora
    assert set(with_lora._adapters) == {"sft", "dpo"} and len(fake_vllm.calls) == 4


def test_run_shares_one_merging_engine_across_stages_on_cpu(fake_vllm, tiny_causal_lm_dir, tmp_path, monkeypatch):
    """`adapter_engine: auto` on a CPU: every stage (base or adapter) gets the same vLLM engine,
    started without LoRA slots, which serves adapters as merged weights; `hf` still sends adapter
    work to transformers and `same` starts vLLM with LoRA slots."""
    import dataclasses

    import torch

    from cai.recipe import Recipe
    from cai.run import RecipeRunner

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lora = LoraConfig(r=2, target_modules="all-linear")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), lora).save_pretrained(tmp_path / "sft")
    recipe = Recipe(name="t", stages=["critique", "sft", "sample"], model=str(tiny_causal_lm_dir), output_dir=str(tmp_path / "run"),
                    engine=EngineSettings(kind="vllm"))
    runner = RecipeRunner(recipe)
    plain = runner.engine()
    with_adapter = runner.engine(adapters={"sft": str(tmp_path / "sft")})
    assert with_adapter is plain and plain.merge_adapters and not plain.lora_enabled
    assert len(fake_vllm.calls) == 1 and not fake_vllm.calls[0].get("enable_lora")
    hf_runner = RecipeRunner(dataclasses.replace(recipe, adapter_engine="hf"))
    assert hf_runner.engine(adapters={"sft": str(tmp_path / "sft")}).name == "hf"
    same = RecipeRunner(dataclasses.replace(recipe, adapter_engine="same")).engine(adapters={"sft": str(tmp_path / "sft")})
    assert same.lora_enabled and not same.merge_adapters and fake_vllm.calls[-1]["enable_lora"]


def test_hf_engine_cache_keys_on_batch_size(tiny_causal_lm_dir, monkeypatch):
    monkeypatch.setattr(engines, "_ENGINES", {})
    model = str(tiny_causal_lm_dir)
    four = get_engine(model, EngineSettings(kind="hf", batch_size=4))
    assert get_engine(model, EngineSettings(kind="hf", batch_size=4, max_model_len=512)) is four
    two = get_engine(model, EngineSettings(kind="hf", batch_size=2))
    assert two is not four and (four.batch_size, two.batch_size) == (4, 2)


# -- a failed start says why (issue 19.7) -----------------------------------------------------------


def _empty_error_caused_by(cause: Exception) -> RuntimeError:
    try:
        try:
            raise cause
        except Exception as inner:
            raise RuntimeError() from inner
    except RuntimeError as outer:
        return outer


def test_vllm_start_failure_carries_the_cause_and_the_main_guard_fix(fake_vllm, tiny_causal_lm_dir, caplog):
    from cai.engines.vllm_engine import VLLMEngine

    fake_vllm.fail = _empty_error_caused_by(RuntimeError(BOOTSTRAP_TEXT))
    with pytest.raises(CaiError) as err:
        VLLMEngine(str(tiny_causal_lm_dir))
    message = str(err.value)
    assert "RuntimeError (caused by RuntimeError: An attempt has been made to start a new process" in message
    assert "bootstrapping phase" in message and 'if __name__ == "__main__":' in message and "\n" not in message
    # `auto` still falls back to transformers, and its warning says why.
    with caplog.at_level("WARNING"):
        engine = get_engine(str(tiny_causal_lm_dir), EngineSettings(kind="auto"))
    assert engine.name == "hf"
    assert "bootstrapping phase" in caplog.text and "__main__" in caplog.text
    # Asked again, auto does not retry a start that already failed with these settings.
    assert get_engine(str(tiny_causal_lm_dir), EngineSettings(kind="auto")) is engine
    assert len(fake_vllm.calls) == 2


def test_vllm_start_failure_with_other_empty_errors_names_the_cause(fake_vllm, tiny_causal_lm_dir):
    from cai.engines.vllm_engine import VLLMEngine

    fake_vllm.fail = _empty_error_caused_by(OSError(28, "No space left on device"))
    with pytest.raises(CaiError) as err:
        VLLMEngine(str(tiny_causal_lm_dir))
    assert "RuntimeError (caused by OSError: [Errno 28] No space left on device)" in str(err.value)
    assert "__main__" not in str(err.value)


def test_engine_request_while_a_spawned_child_bootstraps_is_refused(fake_vllm, tiny_causal_lm_dir, monkeypatch):
    """The child vLLM spawns re-imports an unguarded script: it must stop, not start an engine."""
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(CaiError, match='__name__ == "__main__"'):
        get_engine(str(tiny_causal_lm_dir), EngineSettings(kind="auto"))
    assert fake_vllm.calls == [] and engines._ENGINES == {}


# -- engine processes die with their parent (issue 19.8) ---------------------------------------------


def test_vllm_engine_children_get_a_parent_death_signal(fake_vllm, tiny_causal_lm_dir):
    from cai.engines.vllm_engine import VLLMEngine

    fake_vllm.spawn_child = True
    VLLMEngine(str(tiny_causal_lm_dir))
    assert fake_vllm.child_death_signals == [signal.SIGKILL]
    # Only while vLLM starts: other code's processes are left as they were.
    queue = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(target=_report_death_signal, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == 0
    child.join()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protected", [True, False])
def test_spawned_child_dies_when_its_parent_is_killed(protected):
    """kill -9 of the parent: the child started under the lifeline goes too; one started
    without it is orphaned (the check can see the difference)."""
    script = textwrap.dedent(f"""
        import multiprocessing, sys, time
        from cai.engines.lifeline import children_die_with_parent

        if __name__ == "__main__":
            context = multiprocessing.get_context("spawn")
            serve = dict(target=exec, args=("import time; print('ready', flush=True); time.sleep(600)",))
            if {protected}:
                with children_die_with_parent():
                    child = context.Process(**serve)
                    child.start()
            else:
                child = context.Process(**serve)
                child.start()
            print(child.pid, flush=True)
            sys.stdin.read()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        lines = {parent.stdout.readline().strip(), parent.stdout.readline().strip()}  # the child's pid; "ready" from it
        child_pid = int((lines - {"ready"}).pop())
        assert "ready" in lines and psutil.Process(child_pid).ppid() == parent.pid
        parent.kill()
        parent.wait(timeout=30)
        assert _wait_until(lambda: _gone(child_pid), 10 if protected else 2) is protected
    finally:
        parent.kill()
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
        parent.stdin.close()
        parent.stdout.close()


@pytest.mark.slow
def test_killed_critique_leaves_no_vllm_process_behind(smollm2_dir, tmp_path):
    """`cai critique` on vLLM, killed with SIGKILL once it is generating: nothing it started lives on."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me fact number {i} about bread.\n" for i in range(400)))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "cai.cli", "critique", "--constitution", "constitutions/harmless.yaml",
        "--prompts", str(prompts), "--model", "smollm2-135m-instruct", "--engine", "vllm", "--out", str(out),
        "--rounds", "1", "--max-tokens", "8", "--chunk-size", "2",
    ]
    log_path = tmp_path / "stderr.log"
    log = log_path.open("wb")
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    family: dict[int, str] = {}
    try:
        def generating() -> bool:
            assert run.poll() is None, log_path.read_text(errors="replace")[-3000:]
            for child in psutil.Process(run.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    family[child.pid] = " ".join(child.cmdline())[:120]
            logs = list((out / "work").glob("*.jsonl")) if (out / "work").is_dir() else []
            return any(log.stat().st_size > 0 for log in logs)

        assert _wait_until(generating, 600), "vLLM never started generating"
        assert any("EngineCore" in name or "spawn_main" in name for name in family.values()), family
        run.kill()
        run.wait(timeout=30)
        _wait_until(lambda: all(_gone(pid) for pid in family), 60)
        survivors = {pid: name for pid, name in family.items() if not _gone(pid)}
        assert survivors == {}, f"still running after kill -9 of cai: {survivors}"
    finally:
        for pid in family:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
        log.close()
