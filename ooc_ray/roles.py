"""The roles a config field declares (ooc_ray.config uses them on every field; ooc_ray.keys derives every
artifact's key from them):
  result(feeds=...)  can change the numbers of the named artifacts: enters their keys
  input()            names data or weights; their content digest enters the keys, not the name
  grid()             decides which artifacts exist and what each reads (ratios, LoRA weights, folds, prompts);
                     each artifact's key carries its own grid point and input digests instead
  resource()         where and how fast work runs (GPUs, actors, concurrency, batch sizes that leave the
                     numbers unchanged): never enters a key, so moving to a bigger cluster re-runs nothing
  presentation()     how the report reads finished results: computes nothing, never enters a key
and the bounds a field may declare on its values, which ooc_ray.checks enforces.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any

# Artifacts whose keys config fields can feed (ooc_ray.keys): a domain-pretrained generator base, a LoRA, a
# synthetic image, a backbone-feature cache, a classifier trial, the quality tables, a LoRA-search trial.
ARTIFACTS = ("base", "lora", "image", "features", "trial", "quality", "search")
RESULT, INPUT, GRID, RESOURCE, PRESENTATION = "result", "input", "grid", "resource", "presentation"
BOUNDS = {"ge", "gt", "le", "lt", "unique"}  # what a field may declare of its values (ooc_ray.load checks them)


def _meta(role: str, bounds: dict, **more) -> dict:
    unknown = set(bounds) - BOUNDS
    assert not unknown, unknown
    return {"role": role, **more, **({"bounds": bounds} if bounds else {})}


def result(default: Any, feeds: tuple[str, ...], only_if: tuple[str, Any] | None = None,
           keyed_when_set: bool = False, **bounds: Any) -> Any:
    """A field that can change the numbers of the `feeds` artifacts. `only_if=(sibling, value)`: it matters
    only when that sibling field has that value (img2img strength under txt2img changes nothing).
    `keyed_when_set`: it enters keys only at a value other than its default. For fields added after results
    exist whose default computes exactly what ran before, so an upgrade re-runs none of a user's trials.
    `bounds` (every role takes them): ge / gt / le / lt on a number or on each number of a tuple, unique=True
    for a tuple whose values may not repeat; the loader checks them and names the bound."""
    assert set(feeds) <= set(ARTIFACTS), feeds
    return field(default=default, metadata=_meta(RESULT, bounds, feeds=feeds, only_if=only_if,
                                                 keyed_when_set=keyed_when_set))


def input_(default: Any, **bounds: Any) -> Any:
    return field(default=default, metadata=_meta(INPUT, bounds))


def grid(default: Any, **bounds: Any) -> Any:
    return field(default=default, metadata=_meta(GRID, bounds))


def resource(default: Any, **bounds: Any) -> Any:
    return field(default=default, metadata=_meta(RESOURCE, bounds))


def presentation(default: Any, **bounds: Any) -> Any:
    """How the report reads finished results (a test's margin): computes nothing, so it never enters a key."""
    return field(default=default, metadata=_meta(PRESENTATION, bounds))


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"role": "section"})
