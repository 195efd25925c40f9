"""YAML in, with line numbers for error messages; YAML out, readable.

PyYAML's composed node tree keeps each value's position, so a validation error found on the
plain data can be pointed back at `file:line`. It also lets us reject duplicate keys, which
`yaml.safe_load` silently collapses (the last one wins, and a user's edit vanishes).

Anchors and aliases are allowed (a recipe may reuse a block) but bounded: a document whose
aliases expand to more than `MAX_EXPANDED_NODES` values (a "billion laughs" bomb: nine aliases of
nine aliases of ...) or that refers to itself is refused before anything walks it. PyYAML builds
such a document cheaply, as shared lists, but the first thing that walks it (schema validation,
a fingerprint's `json.dumps`, or PyYAML's own `<<` merge-key flattening) hangs for hours or
exhausts memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from cai.errors import CaiError

MAX_EXPANDED_NODES = 1_000_000

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
            _bound_aliases(root, source)
        loader = _SafeLoader(text)
        try:
            data = loader.get_single_data() if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CaiError(f"malformed YAML: {problem}", source=where) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, OverflowError) as exc:
        # PyYAML's constructors fail on odd tagged scalars with plain Python errors: `!!bool x`
        # (KeyError), `!!timestamp abc` (AttributeError), `!!timestamp 2001-02-30` (ValueError).
        node = getattr(exc, "yaml_node", None)
        if node is None:
            raise CaiError(f"malformed YAML: {type(exc).__name__}: {exc}", source=source) from None
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        what = f"{str(node.value)[:40]!r} is not a valid {tag}" if isinstance(node, yaml.ScalarNode) else f"cannot build this {tag}"
        raise CaiError(f"malformed YAML: {what}", source=f"{source}:{node.start_mark.line + 1}") from None
    return LocatedYaml(data=data, root=root, source=source)


class _SafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with the node a construction error came from attached to the error."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            if not hasattr(exc, "yaml_node"):
                exc.yaml_node = node
            raise


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


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _bound_aliases(root: yaml.Node, source: str) -> None:
    """Count the values the document holds once every alias is expanded (linear time: each
    node's count is computed once); refuse a cycle or more than MAX_EXPANDED_NODES."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            expanded[key] = 1 + sum(expanded[id(child)] for child in _children(node))
            if expanded[key] > MAX_EXPANDED_NODES:
                raise CaiError(
                    f"aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?)",
                    source=f"{source}:{node.start_mark.line + 1}",
                )
            continue
        if key in expanded:
            continue
        if key in open_nodes:  # reached again while still inside it: `&a [*a]`
            raise CaiError("an alias refers to a node that contains it", source=f"{source}:{node.start_mark.line + 1}")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so exported constitutions stay editable by hand."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)
