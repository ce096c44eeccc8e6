"""A job config file read as a person wrote it: YAML bounded in size and alias expansion, a key
given twice refused, ``--set section.field=value`` overrides applied, then validated as a
``JobConfig``. Every error is one line naming the file (or the override) and the line.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from rlfleet.common.config import JobConfig
from rlfleet.common.errors import shown


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``"generators.num_actors=4"`` into its key path and YAML-parsed value."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {shown(override)} must look like section.field=value")
    return key.split("."), parse_yaml(raw, f"override {shown(override)}")


MAX_CONFIG_BYTES = 1 << 20
"""The largest job config file read (1 MiB); a real one is a few KiB."""
MAX_EXPANDED_SIZE = 2 * MAX_CONFIG_BYTES
"""The largest YAML document built, in characters of its scalars plus one per node, each alias
counted as a copy of what it names: so aliases cannot make a small file a huge document (a
"billion laughs" one expands to gigabytes in a message, a tracker or a Ray argument)."""


class BoundedYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader for user-written YAML: a key given twice in one mapping is an error
    (PyYAML keeps the last), and the document may not grow past ``MAX_EXPANDED_SIZE`` through
    aliases, nor alias itself. Each error is one ``ValueError`` line naming ``where`` (the file or
    the override) and the line."""

    def __init__(self, stream: str | bytes, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self.expanded_size = 0
        self.anchored_sizes: dict[int, int] = {}
        """The expanded size of each anchored node, by ``id`` (the nodes live as long as the
        loader's document)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self.anchored_sizes.get(id(node))
            if size is None:
                raise ValueError(
                    f"{self._at(event.start_mark)}: alias *{event.anchor} is inside the node it "
                    "names; a job config cannot be recursive"
                )
            self._grow(size, f"alias *{event.anchor}", event.start_mark)
            return node
        before = self.expanded_size
        node = super().compose_node(parent, index)
        own = len(node.value) + 1 if isinstance(node, yaml.ScalarNode) else 1
        self._grow(own, "the document", event.start_mark)
        if event.anchor is not None:
            self.anchored_sizes[id(node)] = self.expanded_size - before
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_marks: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # a merge (<<) may give keys that the mapping then sets itself
            key = self.construct_object(key_node)
            first = first_marks.setdefault(key, key_node.start_mark)
            if first is not key_node.start_mark:
                raise ValueError(
                    f"{self._at(key_node.start_mark)}: duplicate key {shown(key)} (first at line "
                    f"{first.line + 1}); give each key once"
                )
        return node

    def _grow(self, size: int, what: str, mark: yaml.Mark) -> None:
        self.expanded_size += size
        if self.expanded_size > MAX_EXPANDED_SIZE:
            raise ValueError(
                f"{self._at(mark)}: {what} makes the document larger than "
                f"{MAX_EXPANDED_SIZE:,} characters once its aliases are expanded (each counts as "
                "a copy of what it names); write out fewer repeated values"
            )

    def _at(self, mark: yaml.Mark) -> str:
        return f"{self.where}, line {mark.line + 1}"


def parse_yaml(text: str | bytes, where: str) -> Any:
    """One YAML document read with ``BoundedYamlLoader``; a syntax error is a one-line
    ``ValueError`` naming ``where`` and the line, as are the loader's own errors."""
    loader = BoundedYamlLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a config file of at most ``MAX_CONFIG_BYTES``; a larger one is a one-line
    ``ValueError`` (without reading it whole)."""
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            size = max(os.fstat(file.fileno()).st_size, len(data))
            raise ValueError(
                f"{path} is {size:,} bytes or more; a job config may have at most "
                f"{MAX_CONFIG_BYTES:,} (1 MiB)"
            )
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {key} is not a section")
        node[path[-1]] = value
    return raw


def load_job_config(path: str | os.PathLike[str], overrides: list[str] = ()) -> JobConfig:
    """Read a YAML job config, apply ``--set`` overrides and validate it.

    Relative paths in it are relative to the working directory, as in a submitted Ray job.
    """
    raw = parse_yaml(read_config_file(path), str(path)) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a job config is a mapping of sections, got {type(raw).__name__}")
    return JobConfig.model_validate(apply_overrides(raw, list(overrides)))
