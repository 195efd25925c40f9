import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.constitution import load_constitution
from cai.constitution_import import import_files, parse_transcript
from cai.errors import CaiError

SOURCES = Path(__file__).parent / "fixtures" / "constitution_sources"


def test_llm_swarm_import():
    c = import_files([SOURCES / "llm_swarm.json"], name="swarm")
    assert c.name == "swarm"
    assert [p.id for p in c.principles] == ["principle-01", "principle-02", "principle-03"]
    assert c.principles[1].critique.startswith("Did your last reply state anything")
    assert len(c.few_shot) == 2
    example = c.few_shot[1]
    assert example.messages == ({"role": "user", "content": "When did the first person walk on Mars?"},)
    assert example.response == "Neil Armstrong walked on Mars in 1969."
    assert example.revision.startswith("No one has walked on Mars")


def test_anthropic_files_import_strips_markers():
    c = import_files([SOURCES / "anthropic"], name="paper")
    assert [p.id for p in c.principles] == ["harmful0", "harmful1", "honesty-check"]
    first = c.principles[0]
    assert first.critique == "Name the ways your last reply could cause harm to someone."
    assert first.revision == "Rewrite your last reply with every harmful part removed."
    assert [p.text for p in c.preferences] == [
        "Which of these replies is kinder and less likely to upset someone?",
        "Pick the reply that is more honest about what it does not know.",
    ]
    assert len(c.few_shot) == 2
    multi_turn = c.few_shot[1]
    assert [m["role"] for m in multi_turn.messages] == ["user", "assistant", "user"]
    assert multi_turn.messages[-1]["content"] == "How much bigger than Earth?"
    assert multi_turn.response == "About 100 times wider."
    assert multi_turn.critique_request == "Was anything in your last reply made up?"


def test_cli_import_round_trips(tmp_path):
    out = tmp_path / "imported.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "cai.cli", "constitution", "import", str(SOURCES / "anthropic"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reloaded = load_constitution(out)
    direct = import_files([SOURCES / "anthropic"], name="anthropic")
    assert reloaded.hash == direct.hash
    validate = subprocess.run(
        [sys.executable, "-m", "cai.cli", "constitution", "validate", str(out)], capture_output=True, text=True, timeout=300
    )
    assert validate.returncode == 0 and "3 principles, 2 preferences, 2 few-shot" in validate.stdout


def test_unrecognised_json_is_named(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(CaiError, match="other.json: unrecognised format"):
        import_files([bad])


def test_invalid_json_is_named(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(CaiError, match="broken.json:1: not valid JSON"):
        import_files([bad])


def test_llm_swarm_chat_of_wrong_length(tmp_path):
    data = json.loads((SOURCES / "llm_swarm.json").read_text())
    data["system_chat"][0] = data["system_chat"][0][:4]
    bad = tmp_path / "swarm.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CaiError, match=r"system_chat\[0\].*even number \(>= 6\) of messages"):
        import_files([bad])


def test_llm_swarm_multi_turn_few_shot_is_imported_and_rendered(tmp_path):
    """A public llm-swarm constitution whose few-shot chat has two human turns before the critique
    request (the CAI paper's transcripts are multi-turn too) imports, loads and reaches the model
    turn for turn."""
    from cai.constitution import load_constitution
    from cai.critique import CritiqueRun, CritiqueSettings
    from cai.prompts import PromptSet

    data = json.loads((SOURCES / "llm_swarm.json").read_text())
    chat = data["system_chat"][0]
    data["system_chat"][0] = [
        {"role": "user", "content": "My neighbour's dog barks all night."},
        {"role": "assistant", "content": "That sounds exhausting. Have you talked to them?"},
        *chat,
    ]
    source = tmp_path / "swarm.json"
    source.write_text(json.dumps(data))
    constitution = import_files([source])
    example = constitution.few_shot[0]
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user"]
    assert example.messages[0]["content"] == "My neighbour's dog barks all night."
    assert example.response == chat[1]["content"] and example.revision == chat[5]["content"]

    out = tmp_path / "imported.yaml"
    from cai import yamlio
    from cai.constitution import to_yaml_data

    out.write_text(yamlio.dump(to_yaml_data(constitution)))
    reloaded = load_constitution(out)
    assert reloaded.few_shot == constitution.few_shot

    class Engine:
        model, name = "fake", "fake"

    run = CritiqueRun(Engine(), reloaded, [], PromptSet(), tmp_path / "run", CritiqueSettings(few_shot=1))
    turns = run.few_shot_turns
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4
    assert turns[0]["content"] == "My neighbour's dog barks all night."
    assert turns[2]["content"] == chat[0]["content"] and turns[3]["content"] == chat[1]["content"]
    assert chat[2]["content"] in turns[4]["content"] and turns[-1]["content"] == chat[5]["content"]
    assert run.fingerprint()["few_shot"] == 1


def test_multi_turn_paper_transcript_is_imported():
    transcript = (
        "\n\nHuman: I need to get into my ex's email.\n\nAssistant: Why do you need access?"
        "\n\nHuman: To see who they talk to. How do I guess the password?\n\nAssistant: Try their pet's name."
        "\n\nCritiqueRequest: Identify harmful content.\n\nCritique: It helps break into an account."
        "\n\nRevisionRequest: Remove the harmful content.\n\nRevision: I can't help access someone else's account."
        "\n\nHuman:"
    )
    item = parse_transcript(transcript, "t")
    assert [m["role"] for m in item["messages"]] == ["user", "assistant", "user"]
    assert item["response"] == "Try their pet's name."


def test_preferences_alone_are_not_a_constitution():
    with pytest.raises(CaiError, match="no critique/revision principles"):
        import_files([SOURCES / "anthropic" / "RLMadisonInstructions.json"])


def test_transcript_without_revision_is_rejected():
    with pytest.raises(CaiError, match="must end with CritiqueRequest"):
        parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nCritiqueRequest: x\n\nCritique: y", "t")
