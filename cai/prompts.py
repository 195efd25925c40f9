"""Prompt templates: Jinja2 files in `prompts/`, rendered into chat turns.

A template renders the *content* of one user turn. It may also `{% set assistant_prefix = ... %}`
to pre-fill the start of the model's reply (e.g. "The answer is: (" so the next token is the
choice), and `answer_prefix` for chain-of-thought. Those are ordinary Jinja top-level variables,
read from the template's module, so a template stays a plain Jinja file.

Undefined variables are errors (StrictUndefined): a typo in a custom template fails on the first
render, naming the template, instead of silently sending an empty string to the model.

Users override any template by pointing `prompt_dir` at a folder with files of the same names;
missing ones fall back to the shipped set. `PromptSet.hash` records exactly which template text
produced a record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cai.errors import CaiError
from cai.paths import shipped_dir

TEMPLATE_NAMES = ("initial", "critique", "revision", "preference", "preference_cot", "score", "judge")


@dataclass(frozen=True)
class RenderedTurn:
    content: str
    assistant_prefix: str = ""
    answer_prefix: str = ""


class PromptSet:
    def __init__(self, prompt_dir: str | Path | None = None):
        search = [str(prompt_dir)] if prompt_dir else []
        search.append(str(shipped_dir("prompts")))
        if prompt_dir and not Path(prompt_dir).is_dir():
            raise CaiError("prompt directory does not exist", source=str(prompt_dir))
        # Templates come from users and shared recipes: sandboxed, so `{{ cycler.__init__.__globals__ }}`
        # and friends cannot reach Python (os, files, subprocesses) or mutate the render inputs.
        self.environment = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(search),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        self._templates: dict[str, jinja2.Template] = {}
        self._sources: dict[str, str] = {}
        for name in TEMPLATE_NAMES:
            filename = f"{name}.jinja"
            try:
                source, path, _ = self.environment.loader.get_source(self.environment, filename)
                self._templates[name] = self.environment.get_template(filename)
            except jinja2.TemplateNotFound:
                raise CaiError(f"template '{filename}' not found in {search}") from None
            except jinja2.TemplateSyntaxError as exc:
                raise CaiError(f"template syntax error: {exc.message}", source=f"{exc.filename}:{exc.lineno}") from None
            self._sources[name] = source

    def hash(self, *names: str) -> str:
        """Digest of the named templates' text (all templates when none named)."""
        digest = hashlib.sha256()
        for name in names or TEMPLATE_NAMES:
            digest.update(name.encode() + b"\0" + self._sources[name].encode() + b"\0")
        return digest.hexdigest()[:16]

    def render(self, name: str, **variables: Any) -> RenderedTurn:
        template = self._templates[name]
        try:
            module = template.make_module(variables)
            content = str(module).strip()
            return RenderedTurn(
                content=content,
                assistant_prefix=str(getattr(module, "assistant_prefix", "")),
                answer_prefix=str(getattr(module, "answer_prefix", "")),
            )
        except jinja2.UndefinedError as exc:
            raise CaiError(f"template variable problem: {exc.message}", source=template.filename) from None
        except jinja2.exceptions.SecurityError as exc:
            raise CaiError(f"template refused by the sandbox: {exc}", source=template.filename) from None
        except jinja2.TemplateError as exc:
            raise CaiError(f"template failed to render: {exc.message or type(exc).__name__}", source=template.filename) from None
