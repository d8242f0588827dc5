"""The one typed configuration tree of a run.

Defaults live here, in code. An experiment is a small YAML file that overrides some of them, and
command-line flags override the YAML. Every run saves the resolved tree as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from jewelclf.errors import JewelclfError
from jewelclf.modeling.backbones import get_backbone


@dataclass
class DataConfig:
    """How images are found, checked, split and fed to the model."""

    image_size: Optional[int] = None
    """Square side in pixels. ``None`` takes the backbone's default."""
    batch_size: int = 32
    val_fraction: float = 0.15
    """Share of each class (or of its groups) held out for validation when DATA has no val split."""
    test_fraction: float = 0.0
    """Share held out for testing when DATA has no test split (0 means: no test split)."""
    resize: str = "squash"
    """``squash`` resizes the whole photo to a square; ``crop`` centre-crops to a square first;
    ``pad`` letterboxes it onto a square of its own background colour (white when its border is
    not one colour) first, keeping the aspect ratio of long pieces such as necklaces."""
    cache: str = "auto"
    """Decoded-image cache: ``memory``, ``disk`` (in the run dir), ``none``, or ``auto``."""
    cache_memory_limit_mb: int = 2048
    """With ``cache: auto``, cache in memory below this estimated size, on disk above it."""
    max_pixels: int = 50_000_000
    """Images with more pixels than this are rejected before decoding (decode-bomb guard)."""
    min_image_side: int = 8
    """Images with a side shorter than this are rejected as carrying no usable content."""
    check_workers: int = 4
    allow_leakage: bool = False
    """Train even when a val/test file has a byte-identical copy in another split (``fit``
    refuses such data by default: the copy inflates the held-out scores)."""
    near_duplicate_check: bool = True
    """Also look for near-identical photos (resized, re-encoded) across splits; a warning only."""


@dataclass
class AugmentConfig:
    """Training-time augmentation, run as Keras layers inside the model (on the accelerator)."""

    enabled: bool = True
    in_stage1: bool = False
    """Augment while training the head. Off by default so stage 1 can train on cached features."""
    zoom: float = 0.15
    """Random crop/zoom-in of up to this fraction."""
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    """Kept small: the colour of the metal is part of a jewellery label."""
    blur: float = 0.3
    """Gaussian blur strength, 0..1 (0 turns it off)."""


@dataclass
class ModelConfig:
    """The network: a pretrained backbone and a small classification head."""

    backbone: str = "resnet50"
    weights: str = "imagenet"
    """``imagenet``, ``none``, or a path to a weights file for the backbone without its top."""
    head_units: int = 0
    """Units of the optional hidden Dense layer of the head (the "head size"); 0 means none."""
    dropout: float = 0.2


@dataclass
class Stage1Config:
    """Stage 1: the head alone, with the backbone frozen."""

    epochs: int = 30
    learning_rate: float = 1e-3
    patience: int = 5
    cache_features: str = "auto"
    """``auto`` computes the frozen backbone's features once when stage 1 has no augmentation."""


@dataclass
class Stage2Config:
    """Stage 2: progressive unfreezing of the top of the backbone."""

    epochs: int = 6
    """Epochs of stage 2 in all, shared between the unfreezing steps (0 skips stage 2)."""
    learning_rate: float = 1e-5
    unfreeze_blocks: int = 2
    """How many of the backbone's top blocks to unfreeze, one more per step."""
    patience: int = 3
    reduce_lr_factor: float = 0.3
    reduce_lr_patience: int = 1
    cache_activations: str = "auto"
    """Train each unfreezing step on activations cached at its frozen boundary (the input of the
    lowest unfrozen block): ``views`` augmented views of the training images, one pass of the
    frozen layers each, instead of a pass through the whole backbone every epoch. ``auto``: on
    when the boundary is one tensor, the views fit ``data.cache_memory_limit_mb`` and one
    replica trains (``train.distribute`` on one device); a step that unfreezes every block
    trains the whole model either way; ``on``
    refuses a model or a budget where it cannot; ``off``: every epoch through the whole model."""
    views: int = 1
    """Augmented views of the training images cached per step; epoch ``e`` trains on view
    ``e mod views``. One pass of the frozen layers per view."""


@dataclass
class TrainConfig:
    """The two-stage schedule and what is shared by both stages."""

    seed: int = 1337
    deterministic: bool = False
    """Turn on TensorFlow's op determinism: bit-identical reruns, at a cost in speed."""
    class_weight: str = "auto"
    """``auto`` (balanced when classes differ by more than 1.5:1), ``balanced`` or ``none``."""
    label_smoothing: float = 0.0
    top_k: int = 3
    precision: str = "auto"
    """``float32``, ``mixed_float16``, ``mixed_bfloat16``, or ``auto`` (mixed_float16 when a GPU
    is visible, float32 on a CPU). The softmax always computes in float32."""
    jit_compile: str = "auto"
    """XLA compilation of the training step: ``on``, ``off``, or ``auto`` (Keras' default: on a
    GPU when every layer supports it and no tf.distribute strategy is used)."""
    distribute: str = "none"
    """``none``, ``mirrored`` (all local GPUs) or ``multi_worker`` (machines listed in
    ``TF_CONFIG``). ``data.batch_size`` is per replica; the global batch is that times the
    number of replicas."""
    tensorboard: bool = True
    """Write TensorBoard logs of both stages (and of tune's trials) into the run dir's
    ``tensorboard/``; the viewer is ``pip install tensorboard``, then ``tensorboard --logdir runs/``."""
    target_accuracy: float = 0.98
    """After training, ``fit`` chooses the review threshold: the lowest calibrated confidence at
    which the validation images kept reach this accuracy (the rest need a person's review)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


MAX_SEED = 2**32 - 1
"""The largest ``train.seed``: NumPy's and Keras' seeds are unsigned 32-bit integers."""

_CHOICES = {
    "data.resize": ("squash", "crop", "pad"),
    "data.cache": ("auto", "memory", "disk", "none"),
    "train.class_weight": ("auto", "balanced", "none"),
    "train.stage1.cache_features": ("auto", "on", "off"),
    "train.stage2.cache_activations": ("auto", "on", "off"),
    "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "train.jit_compile": ("auto", "on", "off"),
    "train.distribute": ("none", "mirrored", "multi_worker"),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field's type; return it (ints widen to floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return "none"
        if isinstance(value, bool) and {"on", "off"} <= set(_CHOICES.get(key, ())):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    else:  # pragma: no cover - every field of the tree is one of the above
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise JewelclfError(
        f"config key '{key}' must be {name}, got {value!r} ({type(value).__name__}); fix its value"
    )


def _merge(obj: Any, overrides: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(overrides, dict):
        raise JewelclfError(
            f"{source}: config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
            f"got {overrides!r}"
        )
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise JewelclfError(f"{source}: unknown config key '{full}'; known keys here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, f"{full}.", source)
        else:
            try:
                changes[key] = _coerce(value, hints[key], full)
            except JewelclfError as e:
                raise JewelclfError(f"{source}: {e}") from None
    return dataclasses.replace(obj, **changes)


def merge(config: Config, overrides: dict[str, Any], source: str = "overrides") -> Config:
    """Return ``config`` with nested ``overrides`` applied, checking every key and type."""
    return _merge(config, overrides or {}, "", source)


def set_dotted(overrides: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested override dict (used to turn CLI flags into overrides)."""
    node = overrides
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (where PyYAML lets the
    last one win silently). Keys merged in with ``<<`` may still be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: the base class says so
                    break
                if seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first[key])
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _unsafe_tag(e: yaml.YAMLError) -> str | None:
    """The tag a safe loader has no constructor for (``!!python/object:os.system``), or ``None``."""
    if not isinstance(e, yaml.constructor.ConstructorError):
        return None
    found = re.search(r"constructor for the tag '([^']*)'", e.problem or "")
    if not found:
        return None
    return re.sub(r"^tag:yaml\.org,2002:", "!!", found.group(1))


def parse_yaml(text: str, source: str) -> Any:
    """``text`` read as plain YAML data; a syntax error, a key given twice or a tag that would
    build a Python object (``!!python/object``) is a one-line error naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python objects
    except _DuplicateKey as e:
        raise JewelclfError(f"{source} line {e.line}: key '{e.key}' is given twice (first on line "
                            f"{e.first_line}); keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        tag = _unsafe_tag(e)
        if tag is not None:
            raise JewelclfError(f"{source}{where.replace(' at', '')}: the tag '{tag}' is not allowed "
                                f"(jewelclf reads plain YAML values only); remove it") from None
        raise JewelclfError(f"{source} is not valid YAML{where}; fix its syntax") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML override file; a missing or malformed file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise JewelclfError(f"config file '{path}' does not exist; check the --config path")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), f"config file '{path}'")
    except UnicodeDecodeError as e:
        raise JewelclfError(f"config file '{path}' is not UTF-8 text (byte {e.start} cannot be "
                            f"decoded); save it as UTF-8") from None
    except OSError as e:
        raise JewelclfError(f"config file '{path}' cannot be read ({e.strerror or e}); check its "
                            f"permissions") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JewelclfError(f"config file '{path}' must hold a mapping of config keys at its top")
    return data


def validate(config: Config) -> Config:
    """Check value ranges that types alone cannot; raise a one-line error naming the key."""
    flat = _flatten(config.to_dict())
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise JewelclfError(f"config key '{key}' must be a finite number, got {value}")
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise JewelclfError(
                f"config key '{key}' must be one of {', '.join(choices)}, got {flat[key]!r}"
            )
    positive = ["data.batch_size", "data.max_pixels", "data.check_workers",
                "train.stage1.learning_rate", "train.stage2.learning_rate", "train.top_k",
                "train.stage2.views"]
    non_negative = ["train.stage1.epochs", "train.stage2.epochs", "train.stage2.unfreeze_blocks",
                    "train.stage1.patience", "train.stage2.patience", "model.head_units",
                    "data.min_image_side", "train.stage2.reduce_lr_patience"]
    for key in positive:
        if flat[key] <= 0:
            raise JewelclfError(f"config key '{key}' must be positive, got {flat[key]}")
    for key in non_negative:
        if flat[key] < 0:
            raise JewelclfError(f"config key '{key}' must not be negative, got {flat[key]}")
    fractions = ["data.val_fraction", "data.test_fraction", "model.dropout",
                 "train.label_smoothing", "augment.zoom", "augment.brightness",
                 "augment.contrast", "augment.saturation", "augment.hue", "augment.blur"]
    for key in fractions:
        if not 0.0 <= flat[key] < 1.0 and not (key == "augment.blur" and flat[key] == 1.0):
            raise JewelclfError(f"config key '{key}' must be in [0, 1), got {flat[key]}")
    if (flat["train.stage1.cache_features"] == "on" and flat["augment.enabled"]
            and flat["augment.in_stage1"]):
        raise JewelclfError("config keys 'train.stage1.cache_features: on' and 'augment.in_stage1: "
                            "true' contradict each other: cached features cannot be augmented; set "
                            "cache_features to auto (or off) to augment stage 1, or in_stage1 to false")
    if flat["data.val_fraction"] + flat["data.test_fraction"] >= 0.9:
        raise JewelclfError("config keys 'data.val_fraction' + 'data.test_fraction' must stay below 0.9")
    if not 0.0 < flat["train.stage2.reduce_lr_factor"] < 1.0:
        raise JewelclfError("config key 'train.stage2.reduce_lr_factor' must be in (0, 1)")
    if not 0.0 < flat["train.target_accuracy"] <= 1.0:
        raise JewelclfError(f"config key 'train.target_accuracy' must be in (0, 1], got "
                            f"{flat['train.target_accuracy']} (0.98 means 98% accuracy)")
    if not 0 <= flat["train.seed"] <= MAX_SEED:
        raise JewelclfError(f"config key 'train.seed' must be in 0..{MAX_SEED} (what NumPy and Keras "
                            f"accept), got {flat['train.seed']}")
    if flat["data.image_size"] is not None and flat["data.image_size"] <= 0:
        raise JewelclfError(f"config key 'data.image_size' must be positive, got {flat['data.image_size']}")
    return config


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def absolute_weights(config: Config) -> Config:
    """``model.weights`` as an absolute path when it is a file path (not ``imagenet`` or
    ``none``): a relative one, from a flag or a YAML file, means the working directory's, and
    the configs a run or a search saves must work from any folder."""
    weights = config.model.weights
    if weights.lower() in ("imagenet", "none"):
        return config
    path = os.path.abspath(os.path.expanduser(weights))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, weights=path))


def resolve(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults in code, then the YAML file, then flag overrides; validated. A relative weights
    path is made absolute (:func:`absolute_weights`)."""
    config = Config()
    if config_file:
        config = merge(config, load_yaml(config_file), source=str(config_file))
    if overrides:
        config = merge(config, overrides, source="command line")
    return resolve_derived(absolute_weights(validate(config)))


def resolve_derived(config: Config) -> Config:
    """Fill the fields that follow from others, once: ``data.image_size`` from the backbone
    registry when it is left to the backbone. Every run saves this resolved config, and every
    command reads the size from it. An unknown backbone is left for the registry to refuse
    where the model is built, in its own one-line error."""
    if config.data.image_size is not None:
        return config
    try:
        size = get_backbone(config.model.backbone).default_image_size
    except JewelclfError:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=size))


RETIRED_KEYS = {"data": ("shuffle_buffer",)}
"""Keys that older runs saved and that no longer mean anything: ``data.shuffle_buffer`` (every
epoch is now a whole permutation of the training images)."""


def from_dict(d: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a saved config (e.g. a run's ``config.yaml``); keys older runs saved that no
    longer exist (:data:`RETIRED_KEYS`) are dropped."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in (d or {}).items()}
    for section, keys in RETIRED_KEYS.items():
        for key in keys:
            if isinstance(d.get(section), dict):
                d[section].pop(key, None)
    return resolve_derived(validate(merge(Config(), d, source=source)))
