import pytest

from cai import chat
from cai.errors import CaiError
from cai.prompts import TEMPLATE_NAMES, PromptSet

CONVERSATION = [{"role": "user", "content": "How do I bake bread?"}]


def test_all_templates_render():
    prompts = PromptSet()
    turn = prompts.render(
        "preference",
        conversation=CONVERSATION,
        principle="Which response is more helpful?",
        response_a="Mix flour and water.",
        response_b="I can't help.",
    )
    assert "(A) Mix flour and water." in turn.content and "(B) I can't help." in turn.content
    assert "Human: How do I bake bread?" in turn.content
    assert turn.assistant_prefix.endswith("(")
    cot = prompts.render("preference_cot", conversation=CONVERSATION, principle="p", response_a="a", response_b="b")
    assert cot.answer_prefix.endswith("(") and cot.assistant_prefix
    score = prompts.render("score", conversation=CONVERSATION, principle="Is it helpful?", response="Knead it.")
    assert "1" in score.content and "10" in score.content and score.assistant_prefix == "Rating: [["
    assert prompts.render("initial", prompt="hi").content == "hi"
    critique = prompts.render("critique", request="Point out harm.")
    assert critique.content.startswith("Point out harm.") and critique.assistant_prefix == ""


def test_undefined_variable_is_an_error_naming_template():
    with pytest.raises(CaiError, match="preference.jinja"):
        PromptSet().render("preference", conversation=CONVERSATION, principle="p", response_a="a")


def test_override_directory_changes_hash(tmp_path):
    (tmp_path / "critique.jinja").write_text("CRITIQUE: {{ request }}")
    shipped, custom = PromptSet(), PromptSet(tmp_path)
    assert custom.render("critique", request="x").content == "CRITIQUE: x"
    assert custom.render("revision", request="x").content == shipped.render("revision", request="x").content
    assert custom.hash("critique") != shipped.hash("critique")
    assert custom.hash("revision") == shipped.hash("revision")
    assert len(shipped.hash()) == 16 and set(TEMPLATE_NAMES) == {
        "initial", "critique", "revision", "preference", "preference_cot", "score", "judge"}


def test_template_syntax_error_names_file(tmp_path):
    (tmp_path / "score.jinja").write_text("{% if %}")
    with pytest.raises(CaiError, match="score.jinja:1"):
        PromptSet(tmp_path)


def test_chat_template_used_when_present(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = chat.render(tokenizer, CONVERSATION, assistant_prefix="The answer is: (")
    assert text == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nThe answer is: ("
    tokenizer.chat_template = None
    plain = chat.render(tokenizer, CONVERSATION)
    assert plain == "\n\nHuman: How do I bake bread?\n\nAssistant:"


def test_bad_message_rejected(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    with pytest.raises(CaiError):
        chat.render(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), [{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("attack", [
    "{{ cycler.__init__.__globals__.os.getpid() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set _ = conversation.append('injected') %}{{ request }}",
])
def test_custom_template_cannot_reach_python(tmp_path, attack):
    """A shared prompt folder must not run code: the sandbox refuses, naming the template file."""
    (tmp_path / "critique.jinja").write_text(attack)
    prompts = PromptSet(tmp_path)
    conversation = list(CONVERSATION)
    with pytest.raises(CaiError) as err:
        prompts.render("critique", request="x", conversation=conversation)
    message = str(err.value)
    assert "critique.jinja" in message and "unsafe" in message and "\n" not in message
    assert conversation == CONVERSATION  # nothing was mutated


def test_custom_template_with_ordinary_jinja_still_renders(tmp_path):
    (tmp_path / "judge.jinja").write_text(
        '{%- set assistant_prefix = "Verdict:" -%}'
        "{% for turn in conversation %}{{ turn.role | upper }}={{ turn.content | trim }};{% endfor %}"
        "{{ question ~ '?' }} {{ response | length }} {{ [3, 1, 2] | sort | join(',') }} {{ 'a-b'.split('-') | join('+') }}"
    )
    turn = PromptSet(tmp_path).render("judge", conversation=CONVERSATION, response="abcd", question="Harmful")
    assert turn.content == "USER=How do I bake bread?;Harmful? 4 1,2,3 a+b"
    assert turn.assistant_prefix == "Verdict:"
