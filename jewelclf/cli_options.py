"""The command line's shared pieces: the option declarations that several commands use, the
flags that each set one config key, and the error handling and start-up of every command.

:mod:`jewelclf.cli` declares the commands themselves with these.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from jewelclf.errors import JewelclfError


def handle_errors(fn):
    """Turn user errors into one line on stderr (exit 2) and Ctrl-C into a short note (130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JewelclfError as e:
            prefix = "" if e.exit_code == 130 else "error: "  # 130: an interrupted run's note
            click.echo(f"{prefix}{e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted.", err=True)
            sys.exit(130)
        except Exception as e:  # a full disk anywhere is still a user's problem: one line
            from jewelclf import fsio

            if not fsio.is_disk_full(e):
                raise
            click.echo(f"error: {fsio.disk_full_message(e)}", err=True)
            sys.exit(2)

    return wrapper


VERBOSE = click.option("--verbose", is_flag=True,
                       help="Also show TensorFlow's own start-up and C++ log lines.")


def tta_option(help_text: str):
    """``--tta``: test-time augmentation over a horizontal flip (``flip``; ``none`` without it)."""
    return click.option("--tta", "tta", flag_value="flip", default="none", show_default=False, help=help_text)


def start(verbose: bool, data: str | None = None, run_dir: Path | None = None) -> None:
    """The cheap checks of a command's arguments, then TensorFlow's import (quiet unless
    ``verbose``): a typo'd path costs milliseconds, not the import."""
    if data is not None:
        from jewelclf.data.sources import require_data

        require_data(data)
    if run_dir is not None:
        from jewelclf.runs import require_finished_run

        require_finished_run(Path(run_dir))
    from jewelclf.tfenv import import_tensorflow

    import_tensorflow(verbose)


# --- config flags: each sets one key of the config tree; --help shows the default in code ---

_KEYS: dict[str, str] = {}


def _default_of(key: str) -> str:
    from jewelclf.config import Config

    value: object = Config()
    for part in key.split("."):
        value = getattr(value, part)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "the backbone's" if value is None else str(value)


def config_flag(decl: str, key: str, help: str, shown: str | None = None, **kwargs):
    """A flag that overrides config key ``key`` (None when not given, so YAML still applies)."""
    _KEYS[decl.split("/")[0].lstrip("-").replace("-", "_")] = key
    return click.option(decl, default=None, help=f"{help}  [default: {shown or _default_of(key)}]",
                        **kwargs)


def overrides(**flags) -> dict:
    """The config overrides of the given flags (those not None), as a nested dict."""
    from jewelclf.config import set_dotted

    out: dict = {}
    for flag, value in flags.items():
        if value is not None:
            set_dotted(out, _KEYS[flag], value)
    return out


BACKBONE = config_flag("--backbone", "model.backbone",
                       "Backbone: resnet50, vgg16, mobilenet_v2, mobilenet_025, efficientnet_b0, ...")
_WEIGHTS = config_flag("--weights", "model.weights",
                       "Backbone weights: imagenet (downloaded by Keras), none, or the path of a "
                       "no-top weights file.")
IMAGE_SIZE = config_flag("--image-size", "data.image_size", "Square input side in pixels.",
                         type=click.IntRange(min=1))
_BATCH_SIZE = config_flag("--batch-size", "data.batch_size",
                          "Images per step per replica (with --distribute: x replicas).",
                          type=click.IntRange(min=1))
_EPOCHS = config_flag("--epochs", "train.stage1.epochs",
                      "Stage-1 (head) epochs at most; early stopping may end sooner.", type=int)
_FINE_TUNE_EPOCHS = config_flag("--fine-tune-epochs", "train.stage2.epochs",
                                "Stage-2 (unfreezing) epochs in all; 0 skips stage 2.", type=int)
_VAL_FRACTION = config_flag("--val-fraction", "data.val_fraction",
                            "Held-out share per class when DATA has no val split.", type=float)
_TEST_FRACTION = config_flag("--test-fraction", "data.test_fraction",
                             "Held-out share per class when DATA has no test split.", type=float)
_CLASS_WEIGHT = config_flag("--class-weight", "train.class_weight",
                            "Loss weights per class: balanced, none, or auto (balanced when "
                            "classes differ by more than 1.5:1).",
                            type=click.Choice(["auto", "balanced", "none"]))
_SEED = config_flag("--seed", "train.seed", "The one seed of the run (split, init, shuffling).",
                    type=int)
_DETERMINISTIC = config_flag("--deterministic", "train.deterministic",
                             "TensorFlow op determinism: identical reruns, slower.", is_flag=True)
_ALLOW_LEAKAGE = config_flag("--allow-leakage", "data.allow_leakage",
                             "Train even when a byte-identical image sits in two splits (it "
                             "inflates the test scores).", is_flag=True)
_PRECISION = config_flag(
   "--precision", "train.precision",
   "Compute dtype: auto is mixed_float16 on a GPU, float32 on a CPU; the softmax stays float32.",
   type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]))
_JIT_COMPILE = config_flag("--jit-compile", "train.jit_compile",
                           "XLA compilation of the training step; auto is Keras' choice.",
                           type=click.Choice(["auto", "on", "off"]))
_MODEL_AND_DATA_FLAGS = (BACKBONE, _WEIGHTS, IMAGE_SIZE, _BATCH_SIZE, _EPOCHS, _FINE_TUNE_EPOCHS,
                         _VAL_FRACTION, _TEST_FRACTION, _CLASS_WEIGHT, _SEED, _DETERMINISTIC,
                         _ALLOW_LEAKAGE, _PRECISION, _JIT_COMPILE)
"""The flags ``fit`` and ``tune`` share, with the same names and meaning."""


def model_and_data_flags(fn):
    """Decorate a command with the flags ``fit`` and ``tune`` share."""
    for option in reversed(_MODEL_AND_DATA_FLAGS):
        fn = option(fn)
    return fn


def refuse_with_resume(what: str, config_file, flags: dict, overwrite: bool = False) -> None:
    """Refuse ``--resume`` together with a config or flag: a resumed run keeps its saved config."""
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if config_file:
        given.insert(0, "--config")
    if overwrite:
        given.append("--overwrite")
    if given:
        raise JewelclfError(f"--resume continues the {what} with its saved config; drop "
                            f"{', '.join(given)}, or start a new {what} in another --run-dir")
