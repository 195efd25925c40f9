import collections
import textwrap
from pathlib import Path

import pytest

from cai.constitution import load_constitution, loads_constitution
from cai.errors import CaiError
from cai.paths import shipped_dir

SHIPPED = sorted(shipped_dir("constitutions").glob("*.yaml"))

VALID = """\
name: test
version: "1"
principles:
  - id: harm
    critique: Point out harm.
    revision: Remove the harm.
    weight: 2
  - id: honesty
    critique: Point out falsehoods.
    revision: Fix falsehoods.
preferences:
  - id: less-harmful
    text: Which response is less harmful?
few_shot:
  - prompt: How do I hurt someone?
    response: Like this.
    principle: harm
    critique: That helps hurt people.
    revision: I won't help with that.
"""


def load_text(text: str) -> object:
    return loads_constitution(textwrap.dedent(text), source="c.yaml")


def error_of(text: str) -> str:
    with pytest.raises(CaiError) as err:
        load_text(text)
    message = str(err.value)
    assert "\n" not in message and message.startswith("c.yaml")
    return message


def test_shipped_constitutions_exist():
    names = {p.stem for p in SHIPPED}
    assert {"harmless", "helpful-honest", "company-knowledge"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_constitution_loads(path: Path):
    c = load_constitution(path)
    assert c.principles and c.preferences and c.few_shot
    assert len(c.hash) == 16


def test_harmless_meets_its_minimums():
    c = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    assert len(c.principles) >= 12 and len(c.preferences) >= 8 and len(c.few_shot) >= 1


def test_valid_document_loads_with_resolved_few_shot():
    c = load_text(VALID)
    assert [p.id for p in c.principles] == ["harm", "honesty"]
    assert c.principles[0].weight == 2.0
    example = c.few_shot[0]
    assert example.critique_request == "Point out harm." and example.revision_request == "Remove the harm."
    assert example.messages == ({"role": "user", "content": "How do I hurt someone?"},)


def test_unknown_key_names_line_and_field():
    message = error_of(VALID.replace("    weight: 2\n", "    weight: 2\n    colour: red\n"))
    assert message.startswith("c.yaml:8:")
    assert "principles[0].colour" in message and "unknown key 'colour'" in message


def test_unknown_top_level_key():
    message = error_of(VALID + "author: me\n")
    assert "unknown key 'author'" in message and "c.yaml:20:" in message


def test_duplicate_id_is_an_error():
    message = error_of(VALID.replace("id: honesty", "id: harm"))
    assert "duplicate id 'harm'" in message and "principles[1].id" in message and "c.yaml:8:" in message


def test_duplicate_preference_id():
    text = VALID.replace(
        "preferences:\n", "preferences:\n  - id: less-harmful\n    text: Again?\n"
    )
    assert "duplicate id 'less-harmful'" in error_of(text)


def test_empty_text_is_an_error():
    message = error_of(VALID.replace("critique: Point out falsehoods.", 'critique: "   "'))
    assert "principles[1].critique" in message and "must not be empty" in message and "c.yaml:9:" in message


@pytest.mark.parametrize("weight", ["0", "-1", "heavy", "2000000"])
def test_bad_weight_is_an_error(weight):
    message = error_of(VALID.replace("weight: 2", f"weight: {weight}"))
    assert "principles[0].weight" in message and "c.yaml:7:" in message


def test_missing_required_field():
    message = error_of(VALID.replace("    revision: Fix falsehoods.\n", ""))
    assert "missing required key 'revision'" in message and "principles[1]" in message


def test_few_shot_unknown_principle():
    message = error_of(VALID.replace("principle: harm", "principle: nope"))
    assert "unknown principle id 'nope'" in message and "few_shot[0].principle" in message


def test_malformed_yaml_names_line():
    message = error_of("name: x\nprinciples:\n  - id: [unclosed\n")
    assert "malformed YAML" in message


def test_duplicate_yaml_key_is_an_error():
    assert "duplicate key 'name'" in error_of("name: a\nname: b\nprinciples: []\n")


def test_not_a_mapping():
    assert "mapping" in error_of("- just\n- a list\n")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CaiError, match="nope.yaml: file not found"):
        load_constitution(tmp_path / "nope.yaml")


def test_hash_ignores_formatting_but_tracks_content():
    a = load_text(VALID)
    b = load_text("# a comment\n" + VALID.replace("version: \"1\"", "version: '1'"))
    c = load_text(VALID.replace("Remove the harm.", "Remove all harm."))
    assert a.hash == b.hash != c.hash


def test_sampling_is_reproducible_and_order_independent():
    c = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    first = [p.id for p in c.sampler(seed=7).principles("prompt-1", rounds=4)]
    c.sampler(seed=7).principles("prompt-0", rounds=4)  # drawing for another key first changes nothing
    assert [p.id for p in c.sampler(seed=7).principles("prompt-1", rounds=4)] == first
    others = {tuple(p.id for p in c.sampler(seed=s).principles("prompt-1", rounds=4)) for s in range(20)}
    assert len(others) > 10


def test_no_repeats_within_a_sample_when_enough_principles():
    c = load_constitution(shipped_dir("constitutions") / "harmless.yaml")
    for key in range(200):
        ids = [p.id for p in c.sampler(seed=1).principles(str(key), rounds=len(c.principles))]
        assert len(set(ids)) == len(ids)


def test_more_rounds_than_principles_never_repeats_back_to_back():
    c = load_text(VALID)
    ids = [p.id for p in c.sampler(seed=3).principles("k", rounds=9)]
    assert len(ids) == 9 and all(a != b for a, b in zip(ids, ids[1:]))


def test_sampling_respects_weights():
    text = """\
    name: w
    principles:
      - {id: a, critique: c, revision: r, weight: 1}
      - {id: b, critique: c, revision: r, weight: 2}
      - {id: c, critique: c, revision: r, weight: 3}
      - {id: d, critique: c, revision: r, weight: 4}
    """
    c = load_text(text)
    draws = 20000
    counts = collections.Counter(c.sampler(seed=0).principles(f"k{i}", 1)[0].id for i in range(draws))
    for principle_id, weight in zip("abcd", (1, 2, 3, 4)):
        expected = draws * weight / 10
        # 4 standard deviations of a binomial: fails by chance about once in 15,000 runs.
        tolerance = 4 * (draws * (weight / 10) * (1 - weight / 10)) ** 0.5
        assert abs(counts[principle_id] - expected) < tolerance, counts


def test_preferences_sampled_and_required():
    c = load_text(VALID)
    assert [p.id for p in c.sampler(seed=0).preferences("k")] == ["less-harmful"]
    bare = load_text(VALID.split("preferences:")[0])
    with pytest.raises(CaiError, match="preferences"):
        bare.sampler(seed=0).preferences("k")
