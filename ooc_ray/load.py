"""Reading an experiment file: YAML -> ooc_ray.config's frozen dataclasses, every value checked when it loads.

An experiment file may start from another (`extends: other.yaml`, one level, merged before the file's own
differences); `--tiny` applies config.TINY and the file's own `tiny:` mapping; `-o key=value` overrides come last.
Unknown keys, wrong types, values outside a field's choices or bounds, and combinations that cannot run
(ooc_ray.checks) are ConfigErrors naming every bad dotted key at once, so a typo like `clasify.epochs` never
silently runs the default. Axes and the search's space are checked here: which fields may vary, and each value.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from ooc_ray.checks import build, coerce, problems, raise_problems
from ooc_ray.config import DISTRIBUTIONS, REPLICATE_SEED_STEP, SAME_STEPS_AS_REAL, TINY, ExperimentConfig
from ooc_ray.roles import INPUT, RESOURCE, RESULT
from ooc_ray.errors import ConfigError
from ooc_ray.fields import field_of, field_roles, format_value, to_dict, value_of, with_values
from ooc_ray.variants import variants

# Where an axis may vary a field: what makes or uses synthetic images. Data and folds stay fixed, so every
# variant is tested on the same held-out images and the variants' tables can be compared row by row.
AXIS_SECTIONS = ("generator.", "sample.", "classify.")
AXIS_GRID_FIELDS = ("generator.split", "generator.per_group", "generator.scope")
EXTENDS = "extends"


# ---------------------------------------------------------------------------------------------- axes


def _axis_field(dotted: str, where: str) -> tuple[dict, Any]:
    if not isinstance(dotted, str):
        raise ConfigError(f"{where}: {dotted!r} is not a field's dotted name, e.g. sample.cfg")
    try:
        f, hint = field_of(dotted)
    except KeyError as exc:
        raise ConfigError(f"{where}.{dotted}: {exc.args[0]}") from None
    return dict(f.metadata), hint


def _varied_field(dotted: str, where: str) -> Any:
    """The type hint of a field an axis (or a search dimension) may vary; ConfigError naming `where`.`dotted`
    otherwise: a field that changes no result, shapes the grid, or is data or folds."""
    meta, hint = _axis_field(dotted, where)
    if not dotted.startswith(AXIS_SECTIONS):
        what = "an axis" if where == "axes" else "a search dimension"
        raise ConfigError(f"{where}.{dotted}: {what} varies generator, sample or classify fields; data and folds "
                          "stay fixed so that every variant is tested on the same held-out images")
    if meta["role"] not in (RESULT, INPUT) and dotted not in AXIS_GRID_FIELDS:
        why = ("changes no result, so every value would give the same numbers" if meta["role"] == RESOURCE
               else "is already a dimension of the grid (or shapes it); list its values there")
        raise ConfigError(f"{where}.{dotted}: {why}")
    return hint


def parse_axes(raw: Any) -> tuple:
    """The file's `axes:` mapping -> ((dotted field, (coerced values...)), ...), each checked to be a field that
    changes the synthetic images or the trials."""
    if not isinstance(raw, dict):
        raise ConfigError("axes: expected a mapping of config fields to lists of values, e.g. sample.cfg: [2, 7]")
    out, found = [], []
    for dotted, values in raw.items():
        try:
            out.append(_axis(dotted, values))
        except ConfigError as exc:  # every bad axis named at once
            found.append(str(exc))
    raise_problems(found)
    return tuple(out)


def _axis(dotted: str, values: Any) -> tuple[str, tuple]:
    hint = _varied_field(dotted, "axes")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"axes.{dotted}: expected a non-empty list of values, got {values!r}")
    coerced = tuple(coerce(v, hint, f"axes.{dotted}[{i}]") for i, v in enumerate(values))
    if len(set(map(repr, coerced))) != len(coerced):
        raise ConfigError(f"axes.{dotted}: values repeat ({list(values)})")
    return dotted, coerced


def _unread_in(dotted: str, cfgs: list[ExperimentConfig]) -> tuple[str, object] | None:
    """(sibling, value) of a field read only when that sibling has that value (only_if: sample.strength under
    img2img) where none of `cfgs` has it; None where some config reads the field."""
    only_if = field_of(dotted)[0].metadata.get("only_if")
    if not only_if:
        return None
    sibling = dotted.rsplit(".", 1)[0] + "." + only_if[0]
    return None if any(value_of(c, sibling) == only_if[1] for c in cfgs) else (sibling, only_if[1])


def _inert(dotted: str, cfgs: list[ExperimentConfig], where: str) -> list[str]:
    """A field an axis or the search varies that no config of `cfgs` reads: each value gives the same numbers."""
    unread = _unread_in(dotted, cfgs)
    return [f"{where}.{dotted}: matters only when {unread[0]} is {unread[1]}, which it is nowhere here; every "
            "value would give the same numbers"] if unread else []


def _unguided_negative_prompt(bases: list[ExperimentConfig], space: tuple) -> list[str]:
    """A negative prompt where nothing guides: diffusers reads it only in classifier-free guidance, at
    sample.cfg > 1. Judged over the file's variants (`bases`; the file without axes) with each value of each
    search dimension applied (a choice, a range end), so that any of them that guides makes it legitimate."""
    cfgs = bases + [with_values(base, {name: value}) for base in bases for name, _, values in space
                    for value in values]
    if any(c.sample.negative_prompt for c in cfgs) and all(c.sample.cfg <= 1 for c in cfgs):
        return ["sample.negative_prompt: used only by classifier-free guidance, which sample.cfg 1 turns off "
                "(diffusers guides above 1) in every variant and search point; set sample.cfg above 1 or remove it"]
    return []


def _same_variants(each: list) -> list[str]:
    """Variants that are one config (a sample.seed axis 1000 apart meets the replicates' seeds, seed + 1000 r):
    they would share every pool and trial, and the replicate table would count one run twice as independent."""
    first: dict = {}
    found = []
    for variant in each:
        key = repr(variant.cfg)
        if key in first:
            found.append(f"axes: the variants {first[key]} and {variant.label} are the same config (replicate r "
                         f"samples with sample.seed + {REPLICATE_SEED_STEP} r); make the seeds differ otherwise")
        first.setdefault(key, variant.label)
    return found


def _unread_settings(bases: list[ExperimentConfig], space: tuple) -> list[str]:
    """A field that matters only at another value of a sibling (only_if), set away from its default where that
    sibling has the value in no variant and no search point: the run would record a setting it never read."""
    cfgs = bases + [with_values(base, {name: value}) for base in bases for name, _, values in space
                    for value in values]
    found = []
    for dotted in field_roles():
        unread = _unread_in(dotted, cfgs)
        if unread and any(value_of(c, dotted) != field_of(dotted)[0].default for c in bases):
            found.append(f"{dotted}: set to {format_value(value_of(bases[0], dotted))}, but read only when "
                         f"{unread[0]} is {unread[1]}, which it is nowhere here; remove it")
    return found


def _unmatched_steps_control(cfgs: list[ExperimentConfig]) -> list[str]:
    """real_steps where every variant (`cfgs`) mixes by loss_weighted or replace: none of them runs it
    (protocol.controls_of)."""
    if "real_steps" in cfgs[0].classify.controls and all(c.classify.mixing in SAME_STEPS_AS_REAL for c in cfgs):
        used = ", ".join(sorted({c.classify.mixing for c in cfgs}))
        return [f"classify.controls: real_steps matches the steps of an arm that adds images (concat, split_bn); "
                f"under classify.mixing {used} the arm takes real only's steps, so the control would be real only "
                "again; remove it"]
    return []


# The search trains its LoRAs on one base built before the trials, with split fold, and scores with a linear probe
# on quality.features: a dimension over these would change nothing its trials compute, or need its own base.
SEARCH_FIXED = ("classify.", "generator.pretrain.", "generator.base", "generator.split", "generator.per_group",
                "generator.scope", "sample.replicates")
EIGHT_MULTIPLES = ("generator.resolution", "sample.resolution")  # checks.problems: diffusers refuses others
SEARCH_ONE_WEIGHT = "sample.weights"  # a grid dimension elsewhere; in a search, the one weight a point samples


def _space_values(dotted: str, kind: str, values: Any, hint: Any) -> tuple:
    """The checked values of one search dimension (the choices, or the [low, high] of a range)."""
    where = f"search.space.{dotted}.{kind}"
    if typing.get_origin(hint) is tuple:  # sample.weights: each value is one weight
        hint = typing.get_args(hint)[0]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list, got {values!r}")
    coerced = tuple(coerce(v, hint, f"{where}[{i}]") for i, v in enumerate(values))
    if kind == "choice":
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"{where}: values repeat ({values})")
        return coerced
    if hint is not (int if kind == "randint" else float):
        use = {int: "randint or choice", float: "uniform or loguniform"}.get(hint, "choice")
        raise ConfigError(f"{where}: the field holds {getattr(hint, '__name__', hint)} values; use {use}")
    low, high = coerced if len(coerced) == 2 else (1, 0)
    if not (low <= high if kind == "randint" else low < high):  # randint's range may be one value
        raise ConfigError(f"{where}: expected [low, high] with low below high, got {values}")
    if kind == "loguniform" and coerced[0] <= 0:
        raise ConfigError(f"{where}: a log-uniform range starts above 0, got {values}")
    return coerced


def _space_dimension(dotted: str, spec: Any, cfg: ExperimentConfig) -> tuple:
    hint = field_of(dotted)[1] if dotted == SEARCH_ONE_WEIGHT else _varied_field(dotted, "search.space")
    if dotted.startswith(SEARCH_FIXED):
        raise ConfigError(f"search.space.{dotted}: the search trains on one base (split fold, one LoRA per "
                          "class) and scores with a linear probe on quality.features; this field would change "
                          "nothing its trials compute, or need a base per trial")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search.space.{dotted}: expected one of {{{' | '.join(DISTRIBUTIONS)}: values}}, "
                          f"got {spec!r}")
    kind, values = next(iter(spec.items()))
    if dotted in EIGHT_MULTIPLES and kind != "choice":
        raise ConfigError(f"search.space.{dotted}: a resolution must be a multiple of 8, which a {kind} range cannot "
                          "promise (7 of 8 of its points would fail); use choice: [multiples of 8]")
    values = _space_values(dotted, kind, values, hint)
    known = problems(cfg)
    found = [f"search.space.{dotted} = {value}: {p}" for value in values  # each choice and each end of a range
             for p in problems(with_values(cfg, {dotted: value})) if p not in known]
    raise_problems(found)
    return dotted, kind, values


def parse_space(raw: Any, cfg: ExperimentConfig) -> tuple:
    """The file's `search.space` mapping -> ((dotted field, distribution, values), ...): each a field an axis may
    vary and a search trial uses, with one distribution, and every choice and range end a value the field accepts
    in `cfg` (its bounds and combinations)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search.space: expected a mapping of fields to distributions, e.g. "
                          "generator.unet_lr: {loguniform: [1.0e-4, 3.0e-3]}")
    out, found = [], []
    for dotted, spec in raw.items():
        try:
            out.append(_space_dimension(dotted, spec, cfg))
        except ConfigError as exc:  # every bad dimension named at once
            found.append(str(exc))
    # A dimension its mode ignores, unless another dimension varies that mode: each point of the space's modes
    points = [with_values(cfg, {name: value}) for name, kind, values in out if kind == "choice" for value in values]
    found += [p for name, _, _ in out for p in _inert(name, [cfg, *points], "search.space")]
    raise_problems(found)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- files


_NOT_GIVEN = object()  # a key absent, as against given as null


def _collected(found: list[str], make: Callable[..., Any], *args: Any) -> Any:
    """make(*args), or None with its ConfigError's problems added to `found` (the load goes on to name the rest)."""
    try:
        return make(*args)
    except ConfigError as exc:
        found.extend(getattr(exc, "problems", [str(exc)]))  # each apart: no "(2 problems)" inside the message
        return None


def from_dict(raw: dict | None) -> ExperimentConfig:
    """A validated config from a plain mapping (an experiment file's, after extends, tiny and overrides), or one
    ConfigError naming every problem (checked)."""
    cfg, found = checked(raw)
    raise_problems(found)
    return cfg


def checked(raw: dict | None) -> tuple[ExperimentConfig, list[str]]:
    """(the config, every problem with it): types and bounds, combinations, the search space, the axes and each
    variant, all in one pass. A value of the wrong type (or a misspelt key) leaves its field at its default and
    the checks go on, less each problem naming that field (it would be about the default, not the value given);
    the variants of unreadable axes are left out, and a variant's problems that are the file's own."""
    raw = dict(raw or {})
    axes_raw = raw.pop("axes", None)
    space_raw = _NOT_GIVEN
    if isinstance(raw.get("search"), dict) and "space" in raw["search"]:
        raw["search"] = dict(raw["search"])
        space_raw = raw["search"].pop("space")
    found: list[str] = []
    unused: set[str] = set()
    cfg = build(ExperimentConfig, raw, found=found, defaulted=unused)
    unused -= {"axes"} if axes_raw is not None else set()  # given (popped above): not what a misspelt key meant
    unused -= {"search.space"} if space_raw is not _NOT_GIVEN else set()
    own = problems(cfg)
    later: list[str] = []  # the checks that read the defaults of `unused`
    axes = () if axes_raw is None else _collected(found, parse_axes, axes_raw)
    space = cfg.search.space
    if space_raw is not _NOT_GIVEN:  # `space:` with every line commented out is null: refused
        space = _collected(later, parse_space, space_raw, cfg)
        if space is not None:
            cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, space=space))
    if axes is not None:
        cfg = dataclasses.replace(cfg, axes=axes)
        each = list(variants(cfg)) if cfg.axes or cfg.sample.replicates > 1 else []
        later += _variant_problems(cfg, each, own)
        if space is not None:  # judged over every variant and search point
            configs = [variant.cfg for variant in each] if each else [cfg]  # what runs: each variant, or the file
            later += (_unguided_negative_prompt(configs, space) + _unmatched_steps_control(configs)
                      + _unread_settings(configs, space))
    return cfg, found + _not_naming(own + later, unused)


def _not_naming(found: list[str], keys: set[str]) -> list[str]:
    """`found` less each problem that names one of `keys` or a field under one (a section): such a key kept its
    default for a value that was not used, and a check of the default would not be about the user's value."""
    if not keys:
        return found
    # A dotted key is named wherever it stands; a one-word key (a section, name) only as a path (`data.`, `name:`),
    # not as the word in prose ("share one arm name", "data and folds stay fixed").
    named = re.compile("|".join(rf"(?<![\w.]){re.escape(key)}" + (r"(?!\w)" if "." in key else r"[.:]")
                                for key in sorted(keys)))
    return [p for p in found if not named.search(p)]


def _variant_problems(cfg: ExperimentConfig, each: list, own: list[str]) -> list[str]:
    """The axes' and replicates' variants: two sharing a folder, an axis no variant reads, each variant's own
    problems beyond the file's (`own`), and two that are one config."""
    found, tags = [], {}
    for variant in each:  # each variant's tables live in variants/<tag>/
        if variant.tag in tags:
            found.append(f"axes: the variants {tags[variant.tag]} and {variant.label} would share the folder "
                         f"variants/{variant.tag}/; make their values differ in letters or digits")
        tags.setdefault(variant.tag, variant.label)
    found += [p for dotted, _ in cfg.axes for p in _inert(dotted, [v.cfg for v in each], "axes")]
    where = "axes" if cfg.axes else "sample.replicates"
    labels: dict[str, list[str]] = {}  # a problem -> the variants that have it (one axis value: each replicate)
    for variant in each:  # replicate r samples with seed + 1000 r: its seed must be one too
        for p in problems(variant.cfg):
            if p not in own:
                labels.setdefault(p, []).append(variant.label)
    found += [f"{where} ({'; '.join(names)}): {p}" for p, names in labels.items()]
    return found + _same_variants(each)


def _leaves(dotted: str, value: Any) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of one override: a mapping given for a config section sets its fields one by one
    (as `extends:` merges), never replacing the section whole (`-o 'sample={steps: 3}'` reset every other
    sampling field to its default); a mapping-valued field (search.space, axes) stays one value."""
    roles = field_roles()
    if isinstance(value, dict) and dotted not in roles and any(k.startswith(dotted + ".") for k in roles):
        return [leaf for key, inner in value.items() for leaf in _leaves(f"{dotted}.{key}", inner)]
    return [(dotted, value)]


MAPPING_FIELDS = ("search.space", "axes")  # fields whose value is a mapping keyed by dotted field names


def _into_mapping(dotted: str) -> tuple[str, str] | None:
    """(the mapping-valued field, its key) of an override into one: `search.space.sample.cfg` sets the search
    dimension sample.cfg, `axes.sample.steps` one axis."""
    for field in MAPPING_FIELDS:
        if dotted.startswith(field + "."):
            return field, dotted[len(field) + 1:]
    return None


def known_key(dotted: str) -> bool:
    """A dotted key an override may set: a config field, or one entry of a mapping-valued field."""
    into = _into_mapping(dotted)
    return dotted in field_roles() or (into is not None and into[1] in field_roles())


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw[dotted] = value; one entry of a mapping-valued field is added to the file's mapping, or to the default
    one (search.space's default) where the file gives none."""
    into = _into_mapping(dotted)
    parts = into[0].split(".") + [into[1]] if into else dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        mapping = into and depth == len(parts) - 2
        node = node.setdefault(part, to_dict(ExperimentConfig())["search"]["space"]
                               if mapping and into[0] == "search.space" else {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a {'mapping' if mapping else 'section'}")
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently: a second
    `classify:` block replaced the first whole)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"the key {key!r} is given twice in one mapping (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); YAML would keep the last silently: give it once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        """YAML 1.1 reads `010` as 8 (octal) and `1:30` as 90 (base 60): refused, never silently another number."""
        value = super().construct_yaml_int(node)
        text = str(node.value).replace("_", "").lstrip("+-")
        if ":" in text or (len(text) > 1 and text.startswith("0") and text[1:2] not in ("x", "b", "o")):
            raise ConfigError(f"{node.value!r} (line {node.start_mark.line + 1}) reads as {value} in YAML 1.1 (a "
                              "leading 0 is octal, a colon base 60); write the number without them, or quote it")
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file (name an experiment YAML in it)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _yaml_value(path.read_text()) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:  # a binary file given by mistake
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


# Mappings that are one value, not a section: a file's axes or search space is the whole grid or space it
# means (merged key by key, a child's one-dimension space searched the base's seven dimensions too).
WHOLE_MAPPINGS = (("axes",), ("search", "space"))


def _merged(base: dict, own: dict, path: tuple = ()) -> dict:
    """`own` over `base`: sections merged key by key (so a file changes one field of a section and keeps the
    others), every other value (lists, axes, search.space) replaced whole."""
    out = dict(base)
    for key, value in own.items():
        whole = path + (key,) in WHOLE_MAPPINGS or not (isinstance(value, dict) and isinstance(out.get(key), dict))
        out[key] = value if whole else _merged(out[key], value, path + (key,))
    return out


def read_experiment(path: str | Path) -> dict:
    """An experiment file as a mapping, `extends:` resolved: the named file (relative to this one's folder) first,
    this file's keys merged over it. One level: a base that extends another is refused. The base's name never
    carries over (a file is named after itself)."""
    path = Path(path)
    raw = _read_yaml(path)
    parent = raw.pop(EXTENDS, None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends: expected the file name of another experiment, got {parent!r}")
    base_path = (path.parent / parent).resolve()
    if base_path == path.resolve():
        raise ConfigError(f"{path}: extends: a file cannot extend itself")
    base = _read_yaml(base_path)
    if EXTENDS in base:
        raise ConfigError(f"{path}: extends {parent}, which extends {base[EXTENDS]}: one level only (copy what you "
                          "need into one base file)")
    base.pop("name", None)
    return _merged(base, raw)


def _tiny_problems(tiny_overrides: Any, tiny: bool) -> list[str]:
    """A file's `tiny:` section: a mapping of dotted keys that name config fields (its values are checked when
    --tiny applies them), checked also without --tiny: a typo there would wait for the next smoke test."""
    if tiny_overrides is None:
        return ["no `tiny:` mapping (dotted overrides for tiny mode; {} for none)"] if tiny else []
    if not isinstance(tiny_overrides, dict):
        return [f"tiny: expected a mapping of dotted keys to values, got {tiny_overrides!r}"]
    unknown = [leaf for key, value in tiny_overrides.items() for leaf, _ in _leaves(str(key), value)
               if not known_key(leaf)]
    return [f"tiny: unknown config key(s): {', '.join(unknown)}"] if unknown else []


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), tiny: bool = False
                ) -> ExperimentConfig:
    """Load an experiment YAML; `overrides` are "dotted.key=yaml_value" strings from the CLI (applied last).

    tiny=True applies TINY and the file's own `tiny:` mapping first (seconds-scale settings for tests)."""
    path = Path(path)
    raw = read_experiment(path)
    tiny_overrides = raw.pop("tiny", None)
    raw.setdefault("name", path.stem)
    found = _tiny_problems(tiny_overrides, tiny)
    if tiny:
        for key, value in {**TINY, **(tiny_overrides if isinstance(tiny_overrides, dict) else {})}.items():
            for leaf, leaf_value in _leaves(str(key), value):
                if known_key(leaf):  # an unknown one is named above
                    try:
                        set_dotted(raw, leaf, leaf_value)
                    except ConfigError:  # a section of the file that is no mapping: checked() names it
                        pass
    given: dict[str, list[str]] = {}  # key -> its values as typed, to name a key given twice
    for item in overrides:
        if "=" not in item:
            found.append(f"override {item!r}: expected key=value")
            continue
        key, value = item.split("=", 1)
        try:
            parsed = _yaml_value(value)
        except yaml.YAMLError as exc:
            found.append(f"override {item!r}: the value is not YAML ({str(exc).splitlines()[0]})")
            continue
        except ConfigError as exc:  # a key given twice in a mapping value
            found.append(f"override {item!r}: {exc}")
            continue
        try:
            for leaf, leaf_value in _leaves(key.strip(), parsed):
                given.setdefault(leaf, []).append(value if leaf == key.strip() else item)
                set_dotted(raw, leaf, leaf_value)
        except ConfigError as exc:
            found.append(str(exc))
    # The last value would win, silently: which one was meant is the user's to say.
    found += [f"override {key}: given {len(values)} times ({', '.join(map(repr, values))}); give it once"
              for key, values in given.items() if len(values) > 1]
    found += [f"override {key}: given whole and as {entry}; give one or the other" for key in MAPPING_FIELDS
              if key in given for entry in given if entry.startswith(key + ".")]
    cfg, more = checked(raw)  # the file's problems too: an override that did not apply is named above
    raise_problems(found + more, f"{path}: ")
    return cfg



