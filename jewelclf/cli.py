"""The ``jewelclf`` command line. Each command loads config, applies flags, calls one function."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from jewelclf.errors import JewelclfError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hide CUDA-probe noise on CPU machines


def _handle_errors(fn):
    """Turn user errors into one line on stderr (exit 2) and Ctrl-C into a short note (130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JewelclfError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted.", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="jewelclf")
def main():
    """Turn a folder of product photos into a production image classifier."""


def _overrides(**flags) -> dict:
    from jewelclf.config import set_dotted

    mapping = {
        "backbone": "model.backbone", "weights": "model.weights", "head_units": "model.head_units",
        "dropout": "model.dropout", "image_size": "data.image_size", "batch_size": "data.batch_size",
        "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction",
        "epochs": "train.stage1.epochs", "fine_tune_epochs": "train.stage2.epochs",
        "unfreeze_blocks": "train.stage2.unfreeze_blocks", "learning_rate": "train.stage1.learning_rate",
        "fine_tune_learning_rate": "train.stage2.learning_rate", "seed": "train.seed",
        "class_weight": "train.class_weight", "augment": "augment.enabled",
    }
    out: dict = {}
    for flag, value in flags.items():
        if value is not None:
            set_dotted(out, mapping[flag], value)
    return out


@main.command()
@click.argument("data")
@click.option("--run-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for this run's config, model, history and metrics.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file of config overrides (flags override it in turn).")
@click.option("--backbone", help="Backbone name: resnet50, vgg16, mobilenet_v2, efficientnet_b0, ...")
@click.option("--weights", help="Backbone weights: imagenet, none, or a path to a no-top weights file.")
@click.option("--image-size", type=int, help="Input side in pixels (default: the backbone's).")
@click.option("--batch-size", type=int)
@click.option("--epochs", type=int, help="Stage-1 (head) epochs, at most; early stopping may end sooner.")
@click.option("--fine-tune-epochs", type=int, help="Stage-2 (unfreezing) epochs in all; 0 skips stage 2.")
@click.option("--unfreeze-blocks", type=int, help="How many top backbone blocks stage 2 unfreezes.")
@click.option("--learning-rate", type=float, help="Stage-1 learning rate.")
@click.option("--fine-tune-learning-rate", type=float, help="Stage-2 learning rate.")
@click.option("--head-units", type=int, help="Hidden Dense units in the head (0: none).")
@click.option("--dropout", type=float)
@click.option("--val-fraction", type=float, help="Held-out share per class when DATA has no val split.")
@click.option("--test-fraction", type=float, help="Held-out share per class when DATA has no test split.")
@click.option("--class-weight", type=click.Choice(["auto", "balanced", "none"]))
@click.option("--augment/--no-augment", default=None, help="Training-time augmentation in stage 2.")
@click.option("--seed", type=int, help="The one seed of the run (split, init, shuffling).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --run-dir.")
@_handle_errors
def fit(data, run_dir, config_file, overwrite, **flags):
    """Train a classifier on DATA: a folder of class subfolders, a folder with train/ [val/]
    [test/], a CSV manifest (path,label[,group][,split]), or tfds:NAME[:SPLIT]."""
    from jewelclf.config import resolve
    from jewelclf.training import fit as run_fit

    config = resolve(config_file, _overrides(**flags))
    run_fit(data, run_dir, config, overwrite=overwrite, log=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", type=click.Path(path_type=Path),
              help="Folder for metrics.json and plots (default: RUN_DIR/evaluations/<data>).")
@click.option("--split", type=click.Choice(["train", "val", "test"]),
              help="Which split of DATA to use (default: test if DATA has one, else all of it).")
@_handle_errors
def evaluate(run_dir, data, output, split):
    """Evaluate the model of RUN_DIR on DATA: per-class metrics and a confusion matrix."""
    from jewelclf.evaluation import evaluate_run, format_report

    metrics, out_dir = evaluate_run(run_dir, data, output, split)
    click.echo(format_report(metrics))
    if metrics.get("rejected_files"):
        click.echo(f"{metrics['rejected_files']} unreadable file(s) left out: {out_dir / 'rejected_files.csv'}")
    click.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'confusion_matrix.png'}")


if __name__ == "__main__":  # pragma: no cover
    main()
