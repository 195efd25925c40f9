"""Bad input never escapes as a library traceback; runs do not trample each other; secrets stay secret.

The property-based versions (every loader on random input) are in test_fuzz_loaders.py and
test_fuzz_readers.py; here are the cases that once broke, stated plainly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.data.importers import load_preferences
from cai.errors import CaiError
from cai.prompt_sets import load_prompts
from cai.store import RunLock

CHILD_TIMEOUT = 120  # seconds; a hung child fails its test instead of the whole run


# -- CSV: long fields, quoted newlines, stray \r, malformed files ----------------------------------------

def test_csv_field_over_128_kib_reads(tmp_path):
    long = "x" * (200 * 1024)
    path = tmp_path / "long.csv"
    path.write_text(f'prompt,chosen,rejected\n"q","{long}",no\n', encoding="utf-8")
    records, _ = load_preferences(str(path))
    assert records[0]["chosen"][0]["content"] == long
    (tmp_path / "long_prompts.csv").write_text(f"prompt\n{long}\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "long_prompts.csv"))[0].messages[0]["content"] == long


def test_csv_quoted_newlines_are_one_row_with_its_real_line(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_bytes(b'prompt,chosen,rejected\r\n"first\nquestion","line one\r\nline two",no\r\nsecond,yes,no\r\n')
    records, report = load_preferences(str(path))
    assert report.rows_read == 2
    assert records[0]["prompt"][0]["content"] == "first\nquestion"
    assert records[0]["chosen"][0]["content"] == "line one\r\nline two"  # the field as written, \r\n kept
    assert [r["provenance"]["line"] for r in records] == [2, 5]  # the first row spans lines 2-4
    prompts = load_prompts(str(path))
    assert [p.messages[0]["content"] for p in prompts] == ["first\nquestion", "second"]


def test_csv_stray_carriage_return_ends_a_line(tmp_path):
    """A lone \\r (old Mac line ends, or one stray byte) is a line end, as `open(newline="")` reads it."""
    path = tmp_path / "cr.csv"
    path.write_bytes(b"prompt,chosen,rejected\rq1,a,b\r\nq2,c,d\n")
    records, _ = load_preferences(str(path))
    assert [(r["prompt"][0]["content"], r["provenance"]["line"]) for r in records] == [("q1", 2), ("q2", 3)]
    assert [p.messages[0]["content"] for p in load_prompts(str(path))] == ["q1", "q2"]


@pytest.mark.parametrize("loader", [load_preferences, load_prompts])
def test_two_byte_csv_from_the_fresh_clone_failure_is_a_cai_error(tmp_path, loader):
    path = tmp_path / "tiny.csv"
    path.write_bytes(b"\r\x00")
    with pytest.raises(CaiError, match=r"tiny.csv: contains no"):
        loader(str(path))


@pytest.mark.parametrize("loader", [load_preferences, load_prompts])
def test_malformed_csv_is_one_line_naming_file_and_line(tmp_path, loader):
    path = tmp_path / "bad.csv"
    path.write_text('prompt,chosen,rejected\nq,a,b\n"never closed,a,b\nq3,a,b\n', encoding="utf-8")
    with pytest.raises(CaiError) as caught:
        loader(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:4: malformed CSV in the row starting at line 3") and "\n" not in message
    (tmp_path / "quote.csv").write_text('prompt,chosen,rejected\n"q" trailing,a,b\n', encoding="utf-8")
    with pytest.raises(CaiError, match=r"quote.csv:2: malformed CSV: ',' expected after '\"'"):
        loader(str(tmp_path / "quote.csv"))


def test_csv_duplicate_header_is_refused(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("prompt,chosen,rejected,chosen\nq,a,b,c\n", encoding="utf-8")
    with pytest.raises(CaiError, match=r"dup.csv:1: duplicate column 'chosen'"):
        load_preferences(str(path))


def test_jsonl_prompts_keep_raw_line_separators(tmp_path):
    """U+2028 inside a JSON string is valid JSON; str.splitlines() used to cut the row in two."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "one\u2028two\x85three"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [p.messages[0]["content"] for p in load_prompts(str(path))] == ["one\u2028two\x85three"]


# -- YAML alias bombs -----------------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused_quickly():
    """Nine levels of nine aliases: 9**9 values. PyYAML builds it as shared lists in milliseconds,
    then whatever walks it (schema validation, json.dumps) takes hours."""
    from cai import yamlio

    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(CaiError, match=r"bomb.yaml:\d+: aliases expand to more than 1,000,000 values"):
        yamlio.loads("\n".join(lines), "bomb.yaml")
    merge = ["m0: &m0 {x: 1}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, 24)]
    with pytest.raises(CaiError, match="aliases expand"):  # PyYAML's merge-key flattening doubles per level
        yamlio.loads("\n".join(merge), "merge.yaml")
    with pytest.raises(CaiError, match=r"loop.yaml:1: an alias refers to a node that contains it"):
        yamlio.loads("a: &a [1, *a]\n", "loop.yaml")


@pytest.mark.parametrize("text,line,problem", [
    ("name: x\nenabled: !!bool maybe\n", 2, "'maybe' is not a valid !!bool"),  # KeyError inside PyYAML
    ("when: !!timestamp soon\n", 1, "'soon' is not a valid !!timestamp"),  # AttributeError inside PyYAML
    ("a:\n  b: [!!timestamp 2001-02-30]\n", 2, "'2001-02-30' is not a valid !!timestamp"),  # ValueError
])
def test_yaml_value_that_contradicts_its_tag_names_the_line(text, line, problem):
    from cai import yamlio

    with pytest.raises(CaiError, match=f"^tags.yaml:{line}: malformed YAML: {problem}$"):
        yamlio.loads(text, "tags.yaml")


def test_yaml_small_anchors_still_work():
    from cai import yamlio

    document = yamlio.loads("base: &s {temperature: 0.7}\ncritique: *s\nlabel: {<<: *s, max_tokens: 8}\n", "ok.yaml")
    assert document.data["critique"] == {"temperature": 0.7} and document.data["label"] == {"temperature": 0.7, "max_tokens": 8}


def test_second_run_on_same_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        script = f"from cai.store import RunLock\nwith RunLock({str(tmp_path)!r}): pass"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        assert result.returncode != 0 and f"in use by another cai run (pid {os.getpid()})" in result.stderr
    assert not (tmp_path / ".cai.lock").exists()


def test_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=CHILD_TIMEOUT)
    (tmp_path / ".cai.lock").write_text(str(dead.pid))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".cai.lock").read_text())["pid"] == os.getpid()


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


def test_tests_and_their_subprocesses_use_the_session_cai_cache(cai_cache):
    """A model converted into ~/.cache/cai by an older cai must not stand in for this one's."""
    from cai.paths import cache_dir

    assert cache_dir() == cai_cache and not cai_cache.is_relative_to(Path.home() / ".cache")
    child = subprocess.run([sys.executable, "-c", "from cai.paths import cache_dir; print(cache_dir())"],
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert child.stdout.strip() == str(cai_cache)
