"""The search space of ``jewelclf tune``: which hyperparameters exist, the space file that bounds
them, how they are declared to keras-tuner, and the config a trial's values make.

A space maps hyperparameter names to ``{choice: [...]}``, ``{min, max[, step][, sampling]}``,
``{fixed: value}`` or ``None``; :func:`effective_space` drops those that cannot act under a
config, :func:`declare` registers the rest with a trial's ``HyperParameters``, and
:func:`config_for` turns the trial's values (and a Hyperband budget) into a validated config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras_tuner as kt

from jewelclf.config import Config, merge, parse_yaml, set_dotted, validate
from jewelclf.errors import JewelclfError

AUGMENT_SCALED = ("zoom", "brightness", "contrast", "saturation", "blur")
"""The augmentation settings that ``augment_strength`` multiplies together."""


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One tunable knob: its value type and the config keys it sets."""

    kind: type
    keys: tuple[str, ...]


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "head_units": Hyperparameter(int, ("model.head_units",)),
    "dropout": Hyperparameter(float, ("model.dropout",)),
    "stage1_learning_rate": Hyperparameter(float, ("train.stage1.learning_rate",)),
    "stage2_learning_rate": Hyperparameter(float, ("train.stage2.learning_rate",)),
    "unfreeze_blocks": Hyperparameter(int, ("train.stage2.unfreeze_blocks",)),
    "augment_strength": Hyperparameter(float, tuple(f"augment.{k}" for k in AUGMENT_SCALED)),
}

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "head_units": {"choice": [0, 128, 256, 512, 1024]},
    "dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
    "stage1_learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"},
    "stage2_learning_rate": {"min": 1e-6, "max": 1e-4, "sampling": "log"},
    "unfreeze_blocks": {"min": 0, "max": 3},
    "augment_strength": {"min": 0.0, "max": 2.0, "step": 0.5},
}

Space = dict[str, Any]
"""Hyperparameter name -> ``{choice: [...]}``, ``{min, max[, step][, sampling]}``,
``{fixed: value}``, or ``None`` (not tuned: the config's value is used)."""

_FIELDS = ("choice", "min", "max", "step", "sampling", "fixed")
_SAMPLINGS = ("linear", "log", "reverse_log")





def _value(name: str, v: Any, where: str) -> int | float:
    kind = HYPERPARAMETERS[name].kind
    if name == "head_units" and (v is None or (isinstance(v, str) and v.lower() == "none")):
        return 0
    if kind is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise JewelclfError(f"{where}: {v!r} is not {'an integer' if kind is int else 'a number'}")


def _check_spec(name: str, spec: Any, source: str) -> dict[str, Any]:
    where = f"{source}: space key '{name}'"
    if not isinstance(spec, dict):
        raise JewelclfError(f"{where} must be a mapping such as {{choice: [...]}}, {{min: A, max: B}} "
                            f"or {{fixed: V}}, got {spec!r}")
    unknown = sorted(set(spec) - set(_FIELDS))
    if unknown:
        raise JewelclfError(f"{where} has unknown field '{unknown[0]}'; use choice, min/max "
                            f"(with optional step and sampling) or fixed")
    forms = [f for f in ("choice", "fixed") if f in spec] + (
        ["min/max"] if "min" in spec or "max" in spec else [])
    if len(forms) != 1:
        raise JewelclfError(f"{where} needs exactly one of choice, min/max or fixed"
                            + (f", got {' and '.join(forms)}" if forms else ""))
    if forms[0] != "min/max" and ("step" in spec or "sampling" in spec):
        raise JewelclfError(f"{where}: step and sampling go with min/max only")
    if "choice" in spec:
        values = spec["choice"]
        if not isinstance(values, list):
            raise JewelclfError(f"{where}: choice must be a list of values, got {values!r}")
        if not values:
            raise JewelclfError(f"{where}: choice list is empty; list at least one value")
        out: dict[str, Any] = {"choice": [_value(name, v, where) for v in values]}
        if len(set(out["choice"])) != len(out["choice"]):
            raise JewelclfError(f"{where}: choice list repeats a value")
        candidates = out["choice"]
    elif "fixed" in spec:
        out = {"fixed": _value(name, spec["fixed"], where)}
        candidates = [out["fixed"]]
    else:
        if "min" not in spec or "max" not in spec:
            raise JewelclfError(f"{where} needs both min and max")
        lo, hi = _value(name, spec["min"], where), _value(name, spec["max"], where)
        if lo > hi:
            raise JewelclfError(f"{where}: min {lo} > max {hi}; swap them")
        out = {"min": lo, "max": hi}
        if spec.get("step") is not None:
            step = _value(name, spec["step"], f"{where} step")
            if step <= 0:
                raise JewelclfError(f"{where}: step must be positive, got {step}")
            out["step"] = step
        sampling = spec.get("sampling", "linear")
        if sampling not in _SAMPLINGS:
            raise JewelclfError(f"{where}: sampling must be one of {', '.join(_SAMPLINGS)}, "
                                f"got {sampling!r}")
        if sampling != "linear":
            if lo <= 0:
                raise JewelclfError(f"{where}: {sampling} sampling needs min > 0, got {lo}")
            out["sampling"] = sampling
        candidates = [lo, hi]
    for v in candidates:  # every value must make a valid config (ranges live in config.validate)
        try:
            config_for(Config(), {name: v})
        except JewelclfError as e:
            raise JewelclfError(f"{where}: value {v} is out of range ({e})") from None
    return out


def parse_space(raw: Any, source: str = "search space") -> Space:
    """The default space with the entries of ``raw`` (a mapping from YAML) put in their place."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise JewelclfError(f"{source}: a search space is a mapping of hyperparameter names to "
                            f"ranges; known names: {', '.join(HYPERPARAMETERS)}")
    space: Space = {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    for name, spec in raw.items():
        if name not in HYPERPARAMETERS:
            raise JewelclfError(f"{source}: unknown hyperparameter '{name}'; known: "
                                f"{', '.join(HYPERPARAMETERS)}")
        space[name] = None if spec is None else _check_spec(name, spec, source)
    return space


def load_space(path: str | Path) -> Space:
    """Read a ``--space`` YAML file; any problem is a one-line error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise JewelclfError(f"space file '{path}' does not exist; check the --space path")
    source = f"space file '{path}'"
    return parse_space(parse_yaml(path.read_text(encoding="utf-8"), source), source=source)


def _possible_values(spec: dict[str, Any] | None, config_value: int) -> list[int]:
    """Every value an integer hyperparameter can take (a superset for stepped ranges)."""
    if spec is None:
        return [config_value]
    if "fixed" in spec:
        return [spec["fixed"]]
    if "choice" in spec:
        return list(spec["choice"])
    return list(range(spec["min"], spec["max"] + 1))


def _stage2_only(config: Config) -> list[str]:
    """What acts in stage 2 alone: its learning rate, and augmentation unless on in stage 1."""
    return ["stage2_learning_rate"] + ([] if config.augment.in_stage1 else ["augment_strength"])


def effective_space(space: Space, config: Config) -> tuple[Space, list[str]]:
    """Leave out what cannot matter under ``config``; return the space and why, as notes."""
    out = {k: v for k, v in space.items() if v is not None}
    notes = []
    stage2_only = ["unfreeze_blocks", *_stage2_only(config)]
    if not config.augment.enabled and out.pop("augment_strength", None) is not None:
        notes.append("augmentation is off (augment.enabled: false): augment_strength is not tuned")
    if config.train.stage2.epochs == 0:
        dropped = [k for k in stage2_only if out.pop(k, None) is not None]
        if dropped:
            notes.append(f"stage 2 is off (train.stage2.epochs: 0): {', '.join(dropped)} not tuned")
    elif max(_possible_values(out.get("unfreeze_blocks"), config.train.stage2.unfreeze_blocks)) == 0:
        dropped = [k for k in stage2_only if k != "unfreeze_blocks" and out.pop(k, None) is not None]
        if dropped:
            notes.append(f"unfreeze_blocks is 0 (no stage 2): {', '.join(dropped)} not tuned")
    return out, notes


def _declare_one(hp: kt.HyperParameters, name: str, spec: dict[str, Any]):
    if "fixed" in spec:
        return hp.Fixed(name, spec["fixed"])
    if "choice" in spec:
        return hp.Choice(name, spec["choice"])
    make = hp.Int if HYPERPARAMETERS[name].kind is int else hp.Float
    return make(name, spec["min"], spec["max"], step=spec.get("step"),
                sampling=spec.get("sampling", "linear"))


def declare(hp: kt.HyperParameters, space: Space, config: Config) -> dict[str, Any]:
    """Register ``space`` (an effective space) in ``hp``; return this trial's values.

    What acts in stage 2 alone is conditional on ``unfreeze_blocks > 0``; an inactive value is
    ``None``.
    """
    values: dict[str, Any] = {}
    stage2_only = _stage2_only(config)
    if "unfreeze_blocks" in space:
        values["unfreeze_blocks"] = _declare_one(hp, "unfreeze_blocks", space["unfreeze_blocks"])
    possible = _possible_values(space.get("unfreeze_blocks"), config.train.stage2.unfreeze_blocks)
    positive = [v for v in possible if v > 0]
    conditional = "unfreeze_blocks" in space and len(positive) < len(possible)
    for name in HYPERPARAMETERS:
        if name not in space or name == "unfreeze_blocks":
            continue
        if name in stage2_only and conditional:
            with hp.conditional_scope("unfreeze_blocks", positive):
                values[name] = _declare_one(hp, name, space[name])
        else:
            values[name] = _declare_one(hp, name, space[name])
    return values


def schedule_epochs(config: Config, start: int, end: int) -> tuple[int, int]:
    """Stage-1 and stage-2 epochs of the part ``start..end`` of the schedule (Hyperband budget)."""
    s1, s2 = config.train.stage1.epochs, config.train.stage2.epochs

    def clip(x, lo, n):
        return min(max(x - lo, 0), n)

    return clip(end, 0, s1) - clip(start, 0, s1), clip(end, s1, s2) - clip(start, s1, s2)


def config_for(base: Config, values: dict[str, Any], budget: tuple[int, int] | None = None) -> Config:
    """``base`` with a trial's hyperparameter values (``None``: inactive, keep the base value)
    and, for a Hyperband trial, the stage epochs of its ``budget`` (start, end)."""
    overrides: dict[str, Any] = {}
    for name, v in values.items():
        if v is None or name not in HYPERPARAMETERS:
            continue
        if name == "augment_strength":
            for key in AUGMENT_SCALED:
                cap = 1.0 if key == "blur" else 0.9
                set_dotted(overrides, f"augment.{key}", min(getattr(base.augment, key) * v, cap))
        else:
            set_dotted(overrides, HYPERPARAMETERS[name].keys[0], v)
    if budget is not None:
        e1, e2 = schedule_epochs(base, *budget)
        set_dotted(overrides, "train.stage1.epochs", e1)
        set_dotted(overrides, "train.stage2.epochs", e2)
    return validate(merge(base, overrides, source="search space"))
