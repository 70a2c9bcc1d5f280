"""docs/config-reference.md, generated from ooc_ray/config.py: every field with its default, bounds, role in the
keys and the comment written beside it (the comment above a field, then the one on its line). The test suite
regenerates it and fails when the committed page differs or a field has no comment.

    python -m ooc_ray.config_reference > docs/config-reference.md
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from ooc_ray import config
from ooc_ray.config import ExperimentConfig
from ooc_ray.fields import format_value

ROLES = {
    "result": "result: enters the keys of {feeds}",
    "input": "input: the data it names enters the keys by content",
    "grid": "grid: shapes what is run (which folds, LoRAs, pools, arms, trials); each planned item's key holds what it uses",
    "resource": "resource: where and how fast; enters no key",
    "presentation": "presentation: how the report shows results; enters no key",
}


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment block above the field and the comment on its line(s)."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above = []
            row = stmt.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            inline = []
            for text in lines[stmt.lineno - 1:stmt.end_lineno]:
                code, hash_, comment = text.partition("  # ")
                if hash_:
                    inline.append(comment.strip())
            comments[(node.name, stmt.target.id)] = " ".join(above + inline).strip()
    return comments


def _default(value) -> str:
    """A default as it is written in an experiment file (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return format_value(value)


def _rows(cls: type, prefix: str, comments: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("role") == "section":
            rows += _rows(f.default_factory, f"{prefix}{f.name}.", comments)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        bounds = ", ".join(f"{k} {v}" for k, v in meta.get("bounds", {}).items() if k != "unique")
        if meta.get("bounds", {}).get("unique"):
            bounds = ", ".join(filter(None, [bounds, "no value twice"]))
        role = ROLES.get(meta.get("role", ""), meta.get("role", ""))
        role = role.format(feeds=" and ".join(meta.get("feeds", ())) or "-")
        if meta.get("only_if"):
            key, value = meta["only_if"]
            role += f" (only when {key} is {format_value(value)})"
        rows.append((prefix + f.name, f"`{_default(default)}`", bounds, role, comments.get((cls.__name__, f.name), "")))
    return rows


def reference_rows() -> list[tuple[str, str, str, str, str]]:
    return _rows(ExperimentConfig, "", field_comments())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from `ooc_ray/config.py` by `python -m ooc_ray.config_reference`; do not edit by hand. "
           "Every field of an experiment file, its default, the bounds the loader checks, its role in the keys "
           "(which results a change re-makes) and the comment beside it in the code. How configs compose "
           "(`extends`, `--tiny`, `-o`): [configuration](configuration.md); `axes`: [grid axes](grid.md).", ""]
    section = None
    for name, default, bounds, role, comment in reference_rows():
        top = name.split(".")[0] if "." in name else "(top level)"
        if top != section:
            section = top
            out += ["", f"## {section}", "", "| field | default | bounds | role | what it is |", "|---|---|---|---|---|"]
        out.append(f"| `{name}` | {_cell(default)} | {_cell(bounds)} | {_cell(role)} | {_cell(comment)} |")
    return "\n".join(out) + "\n"


PAGE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

if __name__ == "__main__":
    print(render(), end="")
