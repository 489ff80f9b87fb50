"""The config as the console shows it at the start of a run (log.show_config): compact (the groups chosen, the
command-line overrides, every value that differs from its groups' defaults, where the full config is), the
full tree, or nothing. Plain values in, lines out: cli.py composes the configs, report.py prints the lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

UNSET = object()  # a key one of the two configs lacks (e.g. a schedule stage only a preset defines)
# top-level keys the groups line already says (experiment: the preset's name)
_SKIPPED = ("experiment",)


@dataclass
class ConfigView:
    """What the compact view shows. changed: (key, value, default) for every leaf whose value differs from the
    default config; None when that config could not be composed (then `warning` says why)."""

    groups: dict = field(default_factory=dict)  # group -> chosen option, e.g. {"data": "synthetic"}
    overrides: list = field(default_factory=list)  # the command line's overrides (and a resumed run's)
    from_run: list = field(default_factory=list)  # those of `overrides` that a resume took from the run
    changed: Optional[list] = None
    full_path: str = ".hydra/config.yaml"
    warning: Optional[str] = None


def flatten(tree: Any, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty dicts stay values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_changes(run: dict, default: dict) -> list:
    """(key, value, default) for every leaf of `run` (a resolved config as plain containers) whose value is not
    the one `default` has, in the run's key order; keys only one side has show UNSET on the other."""
    a, b = flatten(run), flatten(default)
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in keys
            if a.get(k, UNSET) != b.get(k, UNSET) and k.split(".")[0] not in _SKIPPED]


def fmt_value(value: Any) -> str:
    """A value as YAML writes it inline: null, true, [a, b]; UNSET as 'unset'."""
    if value is UNSET:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def change_line(key: str, value: Any, default: Any) -> str:
    """'data.batch_size: 32 (default 64)'."""
    was = "not in the default config" if default is UNSET else f"default {fmt_value(default)}"
    return f"{key}: {fmt_value(value)} ({was})"


def view_rows(view: ConfigView) -> list:
    """(label, text) rows of the compact view; a label of '' continues the row above it."""
    rows = [("groups", " ".join(f"{g}={c}" for g, c in view.groups.items()) or "none")]
    marked = [f"{o} (from the run)" if o in view.from_run else o for o in view.overrides]
    rows += _block("overrides", marked or ["none"])
    if view.changed is not None:
        lines = [change_line(*change) for change in view.changed]
        rows += _block("changed", lines or ["none: every value is its group's default"])
    rows.append(("full config", f"{view.full_path} (log.show_config=full prints it)"))
    return rows


def _block(label: str, lines: list) -> list:
    return [(label if i == 0 else "", line) for i, line in enumerate(lines)]


def plain_lines(view: ConfigView) -> list:
    """The compact view as plain text lines, labels in a column."""
    width = max(len(label) for label, _ in view_rows(view))
    return ["config:"] + [f"  {label:<{width}}  {text}" for label, text in view_rows(view)]
