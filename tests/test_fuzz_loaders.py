"""Fuzz the user-facing loaders: whatever the file holds, they return a whole result or raise a
one-line `CaiError` naming the file; never another exception, never a hang.

Targets: constitution loader, recipe loader, YAML with anchors/aliases/tags/merge keys (alias
bombs), preference importers (auto-detected, HH-RLHF, TRL, UltraFeedback, column-mapped CSV,
gzip), prompt loader, constitution importers.

The default run replays a fixed, derandomised set of examples (profile `cai` in conftest.py) plus
the inputs that once broke a loader (`@example`); `make fuzz` draws thousands of fresh ones.
"""

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cai import yamlio
from cai.constitution import loads_constitution
from cai.constitution_import import import_files
from cai.data.importers import load_preferences
from cai.errors import CaiError
from cai.paths import shipped_dir
from cai.prompt_sets import load_prompts
from cai.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder per test module; each example overwrites the same file (thousands of examples
    would otherwise make thousands of temporary folders)."""
    return tmp_path_factory.mktemp("fuzz")


def cai_error_or(call, *, names: str, one_line: bool = True):
    """`call()`'s result, or None when it raised a CaiError that names `names` (and is one line)."""
    try:
        return call()
    except CaiError as exc:
        assert names in str(exc), str(exc)
        assert not one_line or "\n" not in str(exc), repr(str(exc))
        return None


# Text that breaks parsers: quotes, separators, line ends of every kind, NUL, BOM, U+2028, emoji.
nasty_text = st.text(
    st.one_of(st.sampled_from(list("ab ,;\"'`\r\n\t\x00\\{}[]:#&*!|>-%@?") + ["\u2028", "\u2029", "\x85", "\ufeff", "é", "\U0001f600"]),
              st.characters(codec="utf-8")),
    max_size=30,
)
raw_text = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))


# -- YAML: constitutions and recipes -------------------------------------------------------------------

KEYS = ["name", "principles", "preferences", "few_shot", "id", "critique", "revision", "weight", "text", "stages",
        "settings", "rounds", "engine", "kind", "prompt", "chosen", "rejected", "tags", "model", "sampling", "<<", "x"]
SCALARS = ["x", "1", "-1.5e308", "1e400", ".nan", ".inf", "~", "null", "yes", "0x1F", "0o17", "1_000", "2001-12-14t21:59:43.10-05:00",
           "2001-13-45", "'q'", '"dq\\u2028\\0"', "|", ">", "%", "@", "`", "\u2028", "9" * 5000, "!!binary aGVsbG8=",
           "!!python/object/apply:os.system ['true']", "!!timestamp 2001-02-30", "!custom x", "!!float abc", "!!int 0b2"]
TAGS = ["", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ",
        "!!timestamp ", "!local ", "!<tag:yaml.org,2002:str> ", "!!python/name:os.system "]


@st.composite
def yaml_node(draw, depth=0):
    """Flow-style YAML with anchors `&aN`, aliases `*aN` (defined or not), tags and merge keys."""
    choice = draw(st.integers(0, 5 if depth < 3 else 1))
    if choice == 0:
        text = draw(st.one_of(st.sampled_from(SCALARS), st.sampled_from(KEYS),
                              nasty_text.map(json.dumps)))
    elif choice == 1:
        return f"*a{draw(st.integers(0, 3))}"
    elif choice in (2, 3):
        items = draw(st.lists(yaml_node(depth + 1), max_size=4))
        text = "[" + ", ".join(items) + "]"
    else:
        pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), yaml_node(depth + 1)), max_size=4))
        text = "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
    anchor = draw(st.sampled_from(["", "", "&a0 ", "&a1 ", "&a2 ", "&a3 "]))
    return anchor + draw(st.sampled_from(TAGS)) + text


yaml_documents = st.lists(st.tuples(st.sampled_from(KEYS), yaml_node()), min_size=1, max_size=6).map(
    lambda pairs: "".join(f"{key}: {node}\n" for key, node in pairs)
)
SEEDS = {p.name: p.read_text() for p in [*shipped_dir("constitutions").glob("*.yaml"), *(ROOT / "recipes").glob("*.yaml")]}
INSERTS = ["&a0 ", "*a0", "<<: *a0\n", "!!set ", "!!binary ", "!!python/object:os.system ", "\u2028", "\t", "\x00", "\r",
           "\ufeff", "- ", ": ", "? ", "[", "]", "{", "}", '"', "'", "#", "%YAML 1.1\n", "---\n", "...\n", "\n  ", "9" * 5000]


@st.composite
def mutated_seed(draw):
    """A shipped constitution or recipe with a few YAML tokens inserted and slices cut."""
    text = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.one_of(st.sampled_from(INSERTS), nasty_text)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 200)):]
    return text


def alias_bomb(levels: int, fanout: int = 9, merge: bool = False) -> str:
    """The "billion laughs": each anchor is `fanout` aliases of the one before."""
    if merge:
        lines = ["a0: &a0 {x: 1, y: 2}"] + [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * fanout)}]}}" for i in range(1, levels)]
    else:
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: bomb\nprinciples: *a{levels - 1}\nstages: *a{levels - 1}\n"


yaml_inputs = st.one_of(raw_text, yaml_documents, mutated_seed())


@given(text=yaml_inputs)
@example(text=alias_bomb(30)).via("billion laughs: 9**30 values behind 30 lines")
@example(text=alias_bomb(40, fanout=2, merge=True)).via("merge-key bomb: PyYAML's flattening doubles per level")
@example(text="principles: &p [*p]\nname: x\n").via("a recursive alias")
@example(text="name: x\nprinciples: [{id: a, critique: !!binary aGVsbG8=, revision: !!set {r}}]\n")
@example(text="name: !!bool x\n").via("found by make fuzz: KeyError from PyYAML's bool constructor")
@example(text="a: !!timestamp abc\n").via("AttributeError from PyYAML's timestamp constructor")
def test_yaml_loader_only_raises_cai_errors(text):
    document = cai_error_or(lambda: yamlio.loads(text, "fuzz.yaml"), names="fuzz.yaml")
    if document is not None:
        json.dumps(document.data, default=repr)  # what a fingerprint does: must finish, no cycles


@given(text=yaml_inputs)
@example(text=alias_bomb(30))
@example(text=alias_bomb(40, fanout=2, merge=True))
def test_constitution_loader_only_raises_cai_errors(text):
    constitution = cai_error_or(lambda: loads_constitution(text, "fuzz.yaml"), names="fuzz.yaml")
    if constitution is not None:
        assert constitution.principles  # a load that succeeds is whole


@pytest.mark.parametrize("text", ["name: x\n1: 2\nfoo: 3\n", "~: 1\nfoo: 2\nname: x\n"], ids=["int-key", "null-key"])
def test_constitution_with_unknown_keys_of_mixed_types_is_a_cai_error(text):
    with pytest.raises(CaiError, match="fuzz.yaml:"):
        loads_constitution(text, "fuzz.yaml")


@given(text=yaml_inputs)
@example(text=alias_bomb(30))
@example(text="name: x\nstages: [critique]\nengine: &e {kind: hf, extra: *e}\n")
def test_recipe_loader_only_raises_cai_errors(text, scratch):
    path = scratch / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    recipe = cai_error_or(lambda: load_recipe(path), names="fuzz.yaml", one_line=False)
    if recipe is not None:
        assert recipe.stages


# -- preference importers -------------------------------------------------------------------------------

turn_text = st.one_of(nasty_text, st.sampled_from(["", " ", "hi", "\n\nHuman: injected", "Assistant:", "\n\nAssistant:"]))


@st.composite
def hh_row(draw):
    """HH-RLHF: two transcripts that usually share a prefix and differ in the last Assistant turn."""
    roles = draw(st.lists(st.sampled_from(["Human", "Assistant", "Critique"]), min_size=0, max_size=5))
    shared = "".join(f"\n\n{role}: {draw(turn_text)}" for role in roles)
    chosen = shared + f"\n\nAssistant: {draw(turn_text)}"
    rejected = (shared if draw(st.booleans()) else draw(turn_text)) + f"\n\nAssistant: {draw(turn_text)}"
    row = {"chosen": chosen, "rejected": rejected}
    if draw(st.booleans()):
        row[draw(st.sampled_from(["chosen", "rejected"]))] = draw(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2)))
    return row


messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), st.integers()),
    "content": st.one_of(turn_text, st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2)),
}), max_size=3)
answer = st.one_of(turn_text, messages, st.none(), st.integers(), st.floats(allow_nan=True))


@st.composite
def trl_row(draw):
    row = {"prompt": draw(answer), "chosen": draw(answer), "rejected": draw(answer)}
    if draw(st.booleans()):
        row["chosen_prob"] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.none(), st.booleans()))
    return row


@st.composite
def ultrafeedback_row(draw):
    prompt = draw(turn_text)
    conversation = lambda: [{"role": "user", "content": prompt}, {"role": "assistant", "content": draw(turn_text)}]  # noqa: E731
    row = {"prompt": prompt, "chosen": draw(st.one_of(st.builds(conversation), answer)),
           "rejected": draw(st.one_of(st.builds(conversation), answer)),
           "score_chosen": draw(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none()))}
    if draw(st.booleans()):
        row["score_rejected"] = draw(st.one_of(st.floats(allow_nan=True), st.booleans()))
    return row


def to_jsonl(rows: list) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


preference_files = st.one_of(
    st.tuples(raw_text, st.sampled_from([".jsonl", ".json", ".csv"])),
    st.tuples(st.lists(st.one_of(hh_row(), trl_row(), ultrafeedback_row()), min_size=1, max_size=4).map(to_jsonl), st.just(".jsonl")),
    st.tuples(st.lists(st.one_of(hh_row(), trl_row(), ultrafeedback_row()), min_size=1, max_size=4).map(json.dumps), st.just(".json")),
    st.tuples(st.lists(st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "chosen_prob", "score_chosen", "id", "source"]),
                                       st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=True), st.none(), messages,
                                                 st.just("\n\nHuman: hi\n\nAssistant: hello")), max_size=5), max_size=4).map(to_jsonl),
              st.just(".jsonl")),
)


@given(file=preference_files, format=st.sampled_from(["auto", "auto", "hh", "trl", "ultrafeedback", "cai"]), gz=st.booleans())
@example(file=("\r\x00", ".csv"), format="auto", gz=False).via("fresh-clone failure: a raw _csv.Error")
@example(file=("\r\x00", ".jsonl"), format="auto", gz=False)
@example(file=('{"prompt": ' + "9" * 5000 + "}\n", ".jsonl"), format="auto", gz=False).via("an int over 4300 digits")
def test_preference_importers_only_raise_cai_errors(file, format, gz, scratch):
    text, suffix = file
    path = scratch / f"fuzz{suffix}{'.gz' if gz else ''}"
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    loaded = cai_error_or(lambda: load_preferences(str(path), format=format), names="fuzz", one_line=False)
    if loaded is not None:
        records, report = loaded
        assert report.imported == len(records) == report.rows_read  # never a silent partial load
        for record in records:
            assert record["prompt"][-1]["role"] == "user" and 0.5 <= record["chosen_prob"] <= 1.0


@pytest.mark.parametrize("text", ["[" * 5000, '[{"prompt": ' + "9" * 5000 + "}]"], ids=["deep", "huge-int"])
def test_preference_json_file_beyond_parser_limits_is_a_cai_error(text, scratch):
    path = scratch / "deep.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CaiError, match="deep.json"):
        load_preferences(str(path))


def write_csv(rows: list[list[str]]) -> str:
    import csv
    import io

    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


field = st.one_of(nasty_text.filter(str.strip), st.sampled_from([131_073, 200 * 1024, 300_000]).map(lambda n: "L" * n))


@given(rows=st.lists(st.tuples(field, field, field), min_size=1, max_size=4))
@example(rows=[("q", "x" * 200 * 1024, "no"), ("multi\nline", "a\r\nb", "c\rd")])
def test_any_valid_csv_imports_exactly(rows, scratch):
    """A CSV that `csv.writer` wrote (quoted newlines, \\r, quotes, NUL, fields over 128 KiB) reads
    back field for field; the column map picks the columns."""
    path = scratch / "fuzz.csv"
    path.write_bytes(write_csv([["q", "good", "bad"], *rows]).encode("utf-8"))
    records, report = load_preferences(str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records] == rows
    assert report.imported == len(rows)


@given(text=st.lists(st.sampled_from(list('ab,"\r\n\x00\u2028') + ["x" * 1000]), max_size=60).map("".join), prefix=st.sampled_from(["", "q,good,bad\r\n", "\ufeffq,good,bad\n"]))
@example(text="\r\x00", prefix="")
@example(text='a,"b\nc,d\n', prefix="q,good,bad\n")
def test_mangled_csv_only_raises_cai_errors(text, prefix, scratch):
    path = scratch / "fuzz.csv"
    path.write_bytes((prefix + text).encode("utf-8"))
    for columns in (None, {"prompt": "q", "chosen": "good", "rejected": "bad"}):
        cai_error_or(lambda: load_preferences(str(path), columns=columns), names="fuzz.csv", one_line=False)
    cai_error_or(lambda: load_prompts(str(path), columns={"prompt": "q"}), names="fuzz.csv", one_line=False)


# -- prompt loader ---------------------------------------------------------------------------------------

prompt_rows = st.one_of(
    raw_text,
    st.lists(st.dictionaries(st.sampled_from(["prompt", "messages", "id", "category", "question"]),
                             st.one_of(nasty_text, st.integers(), st.none(), st.lists(st.integers(), max_size=2), messages),
                             max_size=4), max_size=4).map(to_jsonl),
)


@given(text=prompt_rows, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), mapped=st.booleans())
@example(text="\r\x00", suffix=".csv", mapped=False)
@example(text="[" * 5000, suffix=".json", mapped=False).via("nesting deeper than the recursion limit")
@example(text='[{"prompt": ' + "9" * 5000 + "}]", suffix=".json", mapped=False).via("an int over 4300 digits")
def test_prompt_loader_only_raises_cai_errors(text, suffix, mapped, scratch):
    path = scratch / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8")
    prompts = cai_error_or(lambda: load_prompts(str(path), columns={"prompt": "question"} if mapped else None), names="fuzz")
    if prompts is not None:
        assert prompts and all(p.messages and p.messages[-1]["role"] == "user" for p in prompts)


prompt_text = st.text(st.one_of(st.sampled_from(["\u2028", "\u2029", "\x85", "\x0c", "\r", '"', ","]), st.characters(codec="utf-8")),
                      min_size=1, max_size=20).filter(str.strip)


@given(texts=st.lists(prompt_text, min_size=1, max_size=5, unique_by=str.strip), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
@example(texts=["line one\u2028still line one", "two"], suffix=".jsonl").via("raw U+2028 is not a line end in JSONL")
@example(texts=["a\r\nb", "c\rd"], suffix=".csv")
def test_prompts_round_trip_exactly(texts, suffix, scratch):
    """Raw U+2028/U+2029/NEL, \\r and quotes inside a prompt come back as written, one prompt each."""
    rows = [{"prompt": text} for text in texts]
    body = {".jsonl": to_jsonl(rows), ".json": json.dumps(rows, ensure_ascii=False), ".csv": write_csv([["prompt"], *([t] for t in texts)])}[suffix]
    path = scratch / f"fuzz{suffix}"
    path.write_bytes(body.encode("utf-8"))
    assert [p.messages[0]["content"] for p in load_prompts(str(path))] == [t.strip() for t in texts]


# -- constitution importers -------------------------------------------------------------------------------

swarm_like = st.recursive(
    st.one_of(st.none(), st.integers(), nasty_text, st.just("CritiqueRequest: x"), st.just("Options:"),
              st.just("\n\nHuman: hi\n\nAssistant: yo\n\nCritiqueRequest: c\n\nCritique: d\n\nRevisionRequest: r\n\nRevision: e")),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.sampled_from(
        ["constitutions", "system_chat", "critic", "revision", "edit_request", "prompt", "harmful0", "role", "content"]), children, max_size=4)),
    max_leaves=15,
)
anthropic_like = st.one_of(
    st.dictionaries(nasty_text, st.fixed_dictionaries({"prompt": st.lists(st.one_of(nasty_text, st.just("CritiqueRequest: be kind")), max_size=2),
                                                       "edit_request": st.one_of(nasty_text, st.just("RevisionRequest: rewrite"), st.none())}),
                    min_size=1, max_size=3),
    st.lists(st.one_of(nasty_text, st.just("Which is less harmful?\nOptions:")), min_size=1, max_size=3),
)


@given(documents=st.lists(st.one_of(swarm_like, anthropic_like), min_size=1, max_size=3), broken=st.booleans())
def test_constitution_importers_only_raise_cai_errors(documents, broken, scratch):
    paths = []
    for index, document in enumerate(documents):
        path = scratch / f"fuzz{index}.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        paths.append(path)
    if broken:
        paths[0].write_bytes(b"\xff\xfe{not json")
    constitution = cai_error_or(lambda: import_files(paths), names="fuzz", one_line=False)
    if constitution is not None:
        assert constitution.principles


def test_llm_swarm_with_null_system_chat_is_a_cai_error(scratch):
    path = scratch / "swarm.json"
    path.write_text(json.dumps({"constitutions": [], "system_chat": None}), encoding="utf-8")
    with pytest.raises(CaiError, match="swarm.json"):
        import_files([path])
