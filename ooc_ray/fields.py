"""Dotted access to the config's fields: set one, format one, list every leaf with its role, find one by name,
and the plain-dict form configs are saved in. The schema itself is ooc_ray.config."""
from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any

from ooc_ray.config import ExperimentConfig


def with_value(cfg: Any, dotted: str, value: Any) -> Any:
    """`cfg` (a config or section) with the field at `dotted` set to `value`."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_value(getattr(cfg, head), rest, value)})


def with_values(cfg: Any, point: dict) -> Any:
    """`cfg` with every {dotted field: value} of `point` set; a single value for a list field (sample.weights)
    becomes that one-element list."""
    for dotted, value in point.items():
        if isinstance(field_of(dotted)[0].default, tuple) and not isinstance(value, tuple):
            value = (value,)
        cfg = with_value(cfg, dotted, value)
    return cfg


def value_of(cfg: Any, dotted: str) -> Any:
    """The value of the field at `dotted`."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(map(format_value, value)) or "none"
    return str(value)


def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples -> lists) for YAML/JSON/Parquet; axes as the mapping an experiment file writes."""
    out = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if isinstance(cfg, ExperimentConfig):
        out["axes"] = {name: values for name, values in out["axes"]}
        out["search"]["space"] = {name: {kind: values} for name, kind, values in out["search"]["space"]}
    return out


def field_roles(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, dict]:
    """dotted field name -> its metadata (role, feeds, only_if, bounds), for every leaf field."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("role") == "section":
            out.update(field_roles(f.default_factory, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = dict(f.metadata)
    return out


# typing.get_type_hints re-evaluates every annotation on each call (0.7 ms; ~2,000 calls to check a config)
type_hints = functools.cache(typing.get_type_hints)


@functools.cache
def field_of(dotted: str) -> tuple[dataclasses.Field, Any]:
    """(the dataclass field, its type hint) of a leaf field by its dotted name; KeyError naming it."""
    cls, parts = ExperimentConfig, dotted.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or fields[part].metadata.get("role") != "section":
            raise KeyError(f"no such config section '{part}'")
        cls = fields[part].default_factory
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if parts[-1] not in fields or fields[parts[-1]].metadata.get("role") == "section":
        raise KeyError("no such config field")
    return fields[parts[-1]], type_hints(cls)[parts[-1]]
