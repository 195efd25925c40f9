"""Safety of cai's files on disk (cai/store.py): --overwrite never deletes what cai did not
write, one run at a time holds an output folder, JSONL readers neither crash nor drop rows, and
atomic writes are fsynced down to the folder entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cai import store
from cai.constitution import loads_constitution
from cai.engines.base import Generation, SamplingSettings
from cai.errors import CaiError
from cai.prompt_sets import Prompt
from cai.store import RunLock, WorkLog, prepare_run_dir

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def user_folder(folder: Path) -> Path:
    """A folder someone else owns: their notes, photos, and a file under a name cai also writes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "metrics.json").write_text('{"mine": true}\n')
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.jpg").write_bytes(bytes(range(256)))
    return folder


# -- a scripted engine: fixed answers per turn, with line-separator characters in the revision -----

CONSTITUTION = """\
name: test
principles:
  - {id: harm, critique: Point out harm., revision: Remove the harm.}
preferences:
  - {id: less-harmful, text: "Which response is less harmful?"}
"""
INITIAL = "Just buy a loaf from a shop."
CRITIQUE = "The answer dodges the question entirely."
REVISION = "Knead the dough\u2028rest it for an hour\u2029then bake at 220 C\x85until golden brown."


class Scripted:
    name, model = "scripted", "scripted-model"

    def generate(self, prompts, sampling, adapter=None, seeds=None):
        def text(request) -> str:
            last = request.messages[-1]["content"]
            return REVISION if "Remove the harm." in last else CRITIQUE if "Point out harm." in last else INITIAL

        return [Generation([text(p)] * sampling.n, 1, [1] * sampling.n, ["stop"] * sampling.n) for p in prompts]


def critique_run(out: Path, *, temperature: float = 1.0, overwrite: bool = False):
    from cai.critique import CritiqueRun, CritiqueSettings
    from cai.prompts import PromptSet

    prompts = [Prompt(id=f"p{i}", messages=({"role": "user", "content": f"How do I bake loaf {i}?"},)) for i in range(3)]
    settings = CritiqueSettings(rounds=1, sampling=SamplingSettings(temperature=temperature, max_tokens=16))
    return CritiqueRun(Scripted(), loads_constitution(CONSTITUTION, "test.yaml"), prompts, PromptSet(), out, settings,
                       overwrite=overwrite, show_progress=False).run()


# -- 1. --overwrite clears only cai's own folders, and only cai's files in them ---------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_refuses_a_folder_cai_did_not_create(tmp_path, overwrite):
    folder = user_folder(tmp_path / "home")
    before = snapshot(folder)
    with pytest.raises(CaiError, match="is not a cai run directory") as error:
        prepare_run_dir(folder, {"stage": "sample", "k": 2}, overwrite=overwrite)
    assert "--overwrite" not in str(error.value) and "\n" not in str(error.value)
    assert snapshot(folder) == before


def test_a_stage_with_overwrite_leaves_a_foreign_folder_byte_for_byte(tmp_path):
    folder = user_folder(tmp_path / "home")
    before = snapshot(folder)
    with pytest.raises(CaiError, match="notes.txt"):
        critique_run(folder, overwrite=True)
    assert snapshot(folder) == before


def test_a_foreign_manifest_json_does_not_make_a_folder_cai_s(tmp_path):
    folder = user_folder(tmp_path / "webapp")
    (folder / "manifest.json").write_text('{"name": "my app", "icons": []}\n')
    before = snapshot(folder)
    with pytest.raises(CaiError, match="not cai's") as error:
        prepare_run_dir(folder, {"stage": "sample"}, overwrite=True)
    assert "--overwrite" not in str(error.value)
    assert snapshot(folder) == before


def test_overwrite_replaces_run_files_and_keeps_the_user_s(tmp_path, caplog):
    """Documented choice: in a folder cai created, --overwrite removes cai's files, keeps the rest
    and names them in a warning (refusing would make the user move their notes first)."""
    out = tmp_path / "run"
    critique_run(out, temperature=1.0)
    assert all(store.is_cai_name(name) for name in store.entries(out))  # CAI_NAMES covers the stage
    (out / "notes.txt").write_text("why I ran this\n")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG fake")
    old_trace = (out / "trace.jsonl").read_bytes()
    old_manifest = json.loads((out / "manifest.json").read_text())
    with pytest.raises(CaiError, match="different settings.*--overwrite"):  # cai's folder: the hint is right
        critique_run(out, temperature=0.5)
    summary = critique_run(out, temperature=0.5, overwrite=True)
    assert summary.resumed is False and summary.sft_rows == 3
    assert (out / "notes.txt").read_text() == "why I ran this\n"
    assert (out / "plots" / "loss.png").read_bytes() == b"\x89PNG fake"
    assert json.loads((out / "manifest.json").read_text()) != old_manifest
    assert (out / "trace.jsonl").read_bytes() != old_trace  # regenerated under the new settings
    assert "kept files cai did not write: notes.txt, plots" in caplog.text


def test_clear_directory_removes_only_cai_names_and_never_follows_links(tmp_path):
    target = user_folder(tmp_path / "elsewhere")
    out = tmp_path / "run"
    prepare_run_dir(out, {"a": 1}, overwrite=False)
    WorkLog(out / "work" / "x.jsonl").append([{"id": "r"}])
    (out / "adapter").symlink_to(target, target_is_directory=True)
    (out / ".responses.jsonl.tmp-123").write_text("partial")
    (out / "mine.csv").write_text("a,b\n")
    before = snapshot(target)
    assert store.clear_directory(out, keep=("manifest.json",)) == ["mine.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mine.csv"]
    assert snapshot(target) == before


def _runner(tmp_path, monkeypatch, fingerprint: str):
    from cai.recipe import Recipe
    from cai.run import RecipeRunner

    calls = []
    monkeypatch.setattr(RecipeRunner, "fingerprint", lambda self, stage: fingerprint)
    monkeypatch.setattr(RecipeRunner, "_blend", lambda self: calls.append("blend") or {})
    return RecipeRunner(Recipe(name="x", stages=["blend"], output_dir=str(tmp_path / "out")), log=lambda m: None), calls


def test_cai_run_refuses_a_stage_folder_without_stage_json(tmp_path, monkeypatch):
    runner, calls = _runner(tmp_path, monkeypatch, "fp-1")
    folder = user_folder(tmp_path / "out" / "blend")
    (folder / "train.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(folder)
    with pytest.raises(CaiError, match="no readable stage.json") as error:
        runner.run()
    assert "--overwrite" not in str(error.value) and calls == []
    assert snapshot(folder) == before


def test_cai_run_clears_a_changed_stage_but_keeps_user_files(tmp_path, monkeypatch):
    runner, calls = _runner(tmp_path, monkeypatch, "fp-2")
    folder = tmp_path / "out" / "blend"
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"fingerprint": "fp-1"}))
    (folder / "train.jsonl").write_text('{"old": 1}\n')
    (folder / "README.txt").write_text("mine")
    runner.run()
    assert calls == ["blend"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.txt", "done.json", "stage.json"]
    assert json.loads((folder / "stage.json").read_text())["fingerprint"] == "fp-2"


# -- 2. exactly one run holds an output folder ------------------------------------------------------

CONTENDER = textwrap.dedent("""
    import sys
    from cai.errors import CaiError
    from cai.store import RunLock
    print("ready", flush=True)
    for command in sys.stdin:
        lock = RunLock(command.split(" ", 1)[1].strip())
        try:
            lock.__enter__()
            print("got", flush=True)
        except CaiError:
            lock = None
            print("refused", flush=True)
        sys.stdin.readline()  # "release": the parent has both answers
        if lock is not None:
            lock.__exit__(None, None, None)
        print("released", flush=True)
""")


def _contender() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CONTENDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, bufsize=1)
    assert child.stdout.readline().strip() == "ready"
    return child


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_two_runs_started_together_never_both_hold_the_lock(tmp_path):
    """Two processes try the same folder at the same moment (released together by one write to
    each pipe), 50 times; half the folders start with a lock file a dead run left behind. (The
    old create-then-write-pid lock let both through in 0.5-30% of rounds, load-dependent; the two
    tests after this one pin each of its races deterministically.)"""
    children = [_contender(), _contender()]
    dead = _dead_pid()
    outcomes = []
    try:
        for round_number in range(50):
            folder = tmp_path / f"r{round_number}"
            folder.mkdir()
            if round_number % 2:
                (folder / ".cai.lock").write_text(str(dead))
            for child in children:
                child.stdin.write(f"go {folder}\n")
            for child in children:
                child.stdin.flush()
            answers = sorted(child.stdout.readline().strip() for child in children)
            outcomes.append(answers)
            for child in children:
                child.stdin.write("release\n")
                child.stdin.flush()
            assert [child.stdout.readline().strip() for child in children] == ["released"] * 2
    finally:
        for child in children:
            child.stdin.close()
            child.wait(timeout=30)
    assert outcomes == [["got", "refused"]] * 50


def _holder(folder: Path) -> subprocess.Popen:
    """A second process holding the run lock on `folder`."""
    holder = _contender()
    holder.stdin.write(f"go {folder}\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "got"
    return holder


def test_a_run_that_has_not_written_its_pid_yet_keeps_its_lock(tmp_path):
    """The instant between creating the lock file and writing the pid into it: an empty lock
    file must not read as stale."""
    holder = _holder(tmp_path)
    try:
        (tmp_path / ".cai.lock").write_bytes(b"")
        with pytest.raises(CaiError, match="is in use by another cai run; wait for it"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_taking_over_a_stale_lock_never_deletes_the_lock_file(tmp_path):
    """Deleting a stale lock file lets a second run that judged it stale delete the file the
    first run just created; the file a run takes over must be the very file that was there."""
    lock = tmp_path / ".cai.lock"
    lock.write_text(str(_dead_pid()))
    os.link(lock, tmp_path / "witness")  # keeps the old file's inode alive, so it cannot be reused
    with RunLock(tmp_path):
        assert os.path.samefile(lock, tmp_path / "witness")


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    with pytest.raises(CaiError, match=f"in use by another cai run \\(pid {holder.pid}\\)"):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / ".cai.lock").read_text())["pid"] == holder.pid  # left behind
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".cai.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".cai.lock").exists()


def test_a_lock_file_naming_a_live_but_unrelated_pid_is_taken_over(tmp_path):
    """A pid in the file is only information: after a reboot or pid reuse it may name a live
    process that holds no lock, and the folder must not stay locked forever."""
    (tmp_path / ".cai.lock").write_text(str(os.getppid()))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".cai.lock").read_text())["pid"] == os.getpid()


# -- 3. readers: JSONL split on "\n" only; work logs and user data report file:line -----------------


def test_line_separators_in_a_model_output_survive_cai_blend(tmp_path):
    from cai import cli

    critique_run(tmp_path / "critique")
    preferences = tmp_path / "critique" / "preferences.jsonl"
    assert "\u2028" in preferences.read_text(encoding="utf-8")  # written raw, as cai writes text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["blend", str(preferences), "--out", str(tmp_path / "blend"), "--eval-fraction", "0"])
    assert exit_info.value.code == 0
    text = (tmp_path / "blend" / "train.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.split("\n") if line]
    assert len(rows) == 3 and all(row["chosen"][-1]["content"] == REVISION for row in rows)
    assert [row["content"] for row in store.read_jsonl(_jsonl(tmp_path / "r.jsonl", [{"content": REVISION}]))] == [REVISION]
    from cai.cli.common import _read_rows  # `cai label --responses`

    assert [row["chosen"][-1]["content"] for row in _read_rows(str(preferences))] == [REVISION] * 3


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _work_log(path: Path, middle: bytes) -> Path:
    path.write_bytes(b'{"id": "a", "text": "one"}\n' + middle + b'\n{"id": "c", "text": "three"}\n')
    return path


@pytest.mark.parametrize("middle, problem", [
    (b'{"id": "b", "text": "tw', "is not valid JSON"),
    (b'{"text": "no id"}', "has no 'id'"),
    (b'{"id": "b", "text": "caf\xe9"}', "is not valid UTF-8"),
])
def test_a_bad_work_log_line_in_the_middle_stops_with_file_and_line_and_deletes_nothing(tmp_path, middle, problem):
    path = _work_log(tmp_path / "labels.jsonl", middle)
    before = path.read_bytes()
    with pytest.raises(CaiError, match=f"labels.jsonl:2: work log row {problem}"):
        WorkLog(path).read()
    assert path.read_bytes() == before


def test_only_an_unterminated_last_work_log_line_is_cut(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    assert list(WorkLog(path).read()) == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'


GOOD_SFT = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


@pytest.mark.parametrize("content, problem", [
    (GOOD_SFT + b'{"messages": [\n', "sft.jsonl:2: not valid JSON"),
    (GOOD_SFT + b'["not", "an", "object"]\n', "sft.jsonl:2: a row must be a JSON object"),
    (GOOD_SFT + b'{"messages": "caf\xe9"}\n', "sft.jsonl:2: not valid UTF-8"),
])
def test_bad_user_sft_data_is_a_cai_error_with_file_and_line(tmp_path, content, problem):
    from cai.train.policy import sft_dataset

    path = tmp_path / "sft.jsonl"
    path.write_bytes(content)
    with pytest.raises(CaiError, match=problem):
        sft_dataset(path)


# -- 4. durability: fsync of the file and of its folder; a damaged manifest keeps the work ---------


@pytest.mark.parametrize("write", [
    lambda path: store.write_json_atomic(path, {"a": 1}),
    lambda path: store.write_jsonl_atomic(path, [{"a": 1}]),
    lambda path: WorkLog(path).append([{"id": "a"}]),
], ids=["json", "jsonl", "worklog"])
def test_writes_fsync_the_file_and_its_folder(tmp_path, fsyncs, write):
    path = tmp_path / "new" / "out.json"
    write(path)
    assert (path.stat().st_ino, False) in fsyncs
    assert (path.parent.stat().st_ino, True) in fsyncs  # the rename / new entry itself
    assert (tmp_path.stat().st_ino, True) in fsyncs  # the folder created for it


def test_model_conversion_rename_is_fsynced(tmp_path, fsyncs):
    from cai.models import materialize_atomically

    def build(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w")

    target = materialize_atomically(tmp_path / "model", build)
    assert (target.parent.stat().st_ino, True) in fsyncs
    assert ((target / "sub").stat().st_ino, True) in fsyncs
    assert ((target / "sub" / "weights.bin").stat().st_ino, False) in fsyncs


def test_an_empty_manifest_is_its_own_error_and_the_work_survives(tmp_path):
    out = tmp_path / "run"
    fingerprint = {"stage": "sample", "k": 2}
    prepare_run_dir(out, fingerprint, overwrite=False)
    WorkLog(out / "work" / "samples.jsonl").append([{"id": f"r{i}"} for i in range(5)])
    (out / "manifest.json").write_bytes(b"")  # what a power cut left before writes were fsynced
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(CaiError, match="manifest.json is empty or unreadable") as error:
            prepare_run_dir(out, fingerprint, overwrite=overwrite)
        assert "untouched" in str(error.value) and "--overwrite" not in str(error.value)
        assert snapshot(out) == before
    # The recovery the message gives: delete the manifest and rerun with the same settings.
    (out / "manifest.json").unlink()
    assert prepare_run_dir(out, fingerprint, overwrite=False) is True
    assert len(WorkLog(out / "work" / "samples.jsonl").read()) == 5
    assert prepare_run_dir(out, fingerprint, overwrite=False) is True  # a manifest again


def test_a_recovered_manifest_in_a_cai_run_stage_folder_resumes_even_with_overwrite(tmp_path):
    """`cai run` passes overwrite to every stage (it checked the stage's fingerprint itself), so
    the recovery (delete the damaged manifest) must resume there too, not clear the work logs."""
    out = tmp_path / "critique"
    out.mkdir()
    (out / "stage.json").write_text(json.dumps({"fingerprint": "fp"}))
    WorkLog(out / "work" / "initial.jsonl").append([{"id": "r1"}, {"id": "r2"}])
    assert prepare_run_dir(out, {"stage": "critique"}, overwrite=True) is True
    assert list(WorkLog(out / "work" / "initial.jsonl").read()) == ["r1", "r2"]
