"""Bad input never escapes as a library traceback; runs do not trample each other; secrets stay secret."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai.constitution import loads_constitution
from cai.constitution_import import import_files
from cai.prompt_sets import load_prompts
from cai.data.importers import load_preferences
from cai.errors import CaiError
from cai.recipe import load_recipe
from cai.store import RunLock

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

yaml_like = st.one_of(
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)),
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(
            ["name", "principles", "preferences", "few_shot", "id", "critique", "revision", "weight", "text", "stages",
             "critique", "settings", "rounds", "engine", "kind", "prompt", "chosen", "rejected", "x"]), children, max_size=5)),
        max_leaves=20,
    ).map(lambda data: json.dumps(data)),
)


@FUZZ
@given(text=yaml_like)
def test_constitution_loader_only_raises_cai_errors(text):
    try:
        constitution = loads_constitution(text, "fuzz.yaml")
    except CaiError as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)
        return
    assert constitution.principles  # a load that succeeds is whole


@FUZZ
@given(text=yaml_like)
def test_recipe_loader_only_raises_cai_errors(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "fuzz.yaml"
    path.write_text(text)
    try:
        recipe = load_recipe(path)
    except CaiError as exc:
        assert "fuzz.yaml" in str(exc)
        return
    assert recipe.stages


rows = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.lists(st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "chosen_prob", "score_chosen", "id", "source"]),
                             st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.none(),
                                       st.lists(st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=10)), max_size=3),
                                       st.just("\n\nHuman: hi\n\nAssistant: hello")), max_size=5), max_size=4)
    .map(lambda items: "\n".join(json.dumps(i) for i in items)),
)


@FUZZ
@given(text=rows, suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_preference_importers_only_raise_cai_errors(text, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / f"fuzz{suffix}"
    path.write_text(text)
    try:
        records, report = load_preferences(str(path))
    except CaiError as exc:
        assert "fuzz" in str(exc)
        return
    assert report.imported == len(records) == report.rows_read  # never a silent partial load


prompt_rows = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
    st.lists(st.dictionaries(st.sampled_from(["prompt", "messages", "id", "category", "question"]),
                             st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers(), max_size=2),
                                       st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                                st.one_of(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=8), st.integers())),
                                                max_size=3)), max_size=4), max_size=4)
    .map(lambda items: "\n".join(json.dumps(i) for i in items)),
)


@FUZZ
@given(text=prompt_rows, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), mapped=st.booleans())
def test_prompt_loader_only_raises_cai_errors(text, suffix, mapped, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / f"fuzz{suffix}"
    path.write_text(text)
    try:
        prompts = load_prompts(str(path), columns={"prompt": "question"} if mapped else None)
    except CaiError as exc:
        assert "fuzz" in str(exc) and "\n" not in str(exc)
        return
    assert prompts and all(p.messages and p.messages[-1]["role"] == "user" for p in prompts)


swarm_like = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=15), st.just("CritiqueRequest: x"), st.just("Options:"),
              st.just("\n\nHuman: hi\n\nAssistant: yo\n\nCritiqueRequest: c\n\nCritique: d\n\nRevisionRequest: r\n\nRevision: e")),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.sampled_from(
        ["constitutions", "system_chat", "critic", "revision", "edit_request", "prompt", "harmful0", "role", "content"]), children, max_size=4)),
    max_leaves=15,
)


@FUZZ
@given(document=swarm_like)
def test_constitution_importers_only_raise_cai_errors(document, tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "fuzz.json"
    path.write_text(json.dumps(document))
    try:
        constitution = import_files([path])
    except CaiError as exc:
        assert "fuzz" in str(exc) or "import of" in str(exc)
        return
    assert constitution.principles


def test_second_run_on_same_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        script = f"from cai.store import RunLock\nwith RunLock({str(tmp_path)!r}): pass"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode != 0 and f"in use by another cai run (pid {os.getpid()})" in result.stderr
    assert not (tmp_path / ".cai.lock").exists()


def test_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".cai.lock").write_text(str(dead.pid))
    with RunLock(tmp_path):
        assert (tmp_path / ".cai.lock").read_text() == str(os.getpid())


def test_pickle_checkpoints_are_refused(tmp_path, tiny_causal_lm_dir):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from cai.loading import load_causal_lm

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_causal_lm_dir, folder)
    state = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CaiError, match="cannot load model"):
        load_causal_lm(str(folder))


def test_trust_remote_code_is_off_by_default():
    import inspect

    from cai import loading
    from cai.engines import EngineSettings
    from cai.recipe import Recipe

    assert inspect.signature(loading.load_causal_lm).parameters["trust_remote_code"].default is False
    assert EngineSettings().trust_remote_code is False and Recipe(name="x", stages=["critique"]).trust_remote_code is False


def test_api_key_never_reaches_output_files(tmp_path, monkeypatch, tiny_tokenizer_dir):
    """A full critique run through the OpenAI engine: the key is sent, and written nowhere."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from cai.constitution import load_constitution
    from cai.critique import CritiqueRun, CritiqueSettings
    from cai.engines.base import SamplingSettings
    from cai.engines.openai_engine import OpenAIEngine, OpenAISettings
    from cai.paths import shipped_dir
    from cai.prompt_sets import Prompt
    from cai.prompts import PromptSet

    secret = "sk-cai-test-9f8e7d6c5b4a"
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"index": 0, "text": "A careful answer.", "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 3, "completion_tokens": 3}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    engine = OpenAIEngine("served", OpenAISettings(base_urls=(f"http://127.0.0.1:{server.server_address[1]}/v1",),
                                                   api_key_env="CAI_TEST_KEY", tokenizer=str(tiny_tokenizer_dir)))
    prompts = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"q{i}"},)) for i in range(3)]
    CritiqueRun(engine, load_constitution(shipped_dir("constitutions") / "harmless.yaml"), prompts, PromptSet(), tmp_path,
                CritiqueSettings(rounds=1, sampling=SamplingSettings(max_tokens=8)), show_progress=False).run()
    server.shutdown()
    assert seen and all(h == f"Bearer {secret}" for h in seen)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 5
    for path in written:
        assert secret not in path.read_text(errors="replace"), path


def test_write_failure_is_a_clear_error_and_keeps_rows(tmp_path, monkeypatch):
    from cai.store import WorkLog

    log = WorkLog(tmp_path / "w.jsonl")
    log.append([{"id": "a"}])
    real_open = type(log.path).open

    def full_disk(self, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(log.path), "open", full_disk)
    with pytest.raises(CaiError, match="w.jsonl: cannot write work log: No space left on device"):
        log.append([{"id": "b"}])
    monkeypatch.undo()
    assert list(log.read()) == ["a"]
