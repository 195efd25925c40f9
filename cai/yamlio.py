"""YAML in, with line numbers for error messages; YAML out, readable.

PyYAML's composed node tree keeps each value's position, so a validation error found on the
plain data can be pointed back at `file:line`. It also lets us reject duplicate keys, which
`yaml.safe_load` silently collapses (the last one wins, and a user's edit vanishes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from cai.errors import CaiError


@dataclass
class LocatedYaml:
    data: Any
    root: yaml.Node | None
    source: str

    def line_of(self, path: Sequence[str | int], key: str | None = None) -> int | None:
        """1-based line of the value at `path`; of the key `key` inside it when given."""
        node = self.root
        for part in path:
            node = _child(node, part)
            if node is None:
                return None
        if key is not None and isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.value == key:
                    return key_node.start_mark.line + 1
        return node.start_mark.line + 1 if node is not None else None

    def error(self, message: str, path: Sequence[str | int] = (), key: str | None = None) -> CaiError:
        line = self.line_of(path, key)
        source = f"{self.source}:{line}" if line else self.source
        field = format_path([*path, key] if key else path) or None
        return CaiError(message, source=source, field=field)


def format_path(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load(path: str | Path) -> LocatedYaml:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaiError("file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CaiError(f"cannot read file: {exc}", source=str(path)) from None
    return loads(text, str(path))


def loads(text: str, source: str = "<string>") -> LocatedYaml:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _reject_duplicate_keys(root, source)
        data = yaml.safe_load(text) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CaiError(f"malformed YAML: {problem}", source=where) from None
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        # Reached by odd scalars (e.g. a timestamp out of range); still a user-input problem.
        raise CaiError(f"malformed YAML: {exc}", source=source) from None
    return LocatedYaml(data=data, root=root, source=source)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=100)


def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == part:
                return value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part]
    return None


def _reject_duplicate_keys(root: yaml.Node, source: str) -> None:
    stack = [root]
    seen_nodes: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # anchors/aliases share nodes
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in keys:
                        raise CaiError(
                            f"duplicate key '{key_node.value}'", source=f"{source}:{key_node.start_mark.line + 1}"
                        )
                    keys.add(key_node.value)
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so exported constitutions stay editable by hand."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)
