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
            prefix = "" if e.exit_code == 130 else "error: "  # 130: an interrupted run's note
            click.echo(f"{prefix}{e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\ninterrupted.", err=True)
            sys.exit(130)
        except Exception as e:  # a full disk anywhere is still a user's problem: one line
            from jewelclf import rundir

            if not rundir.is_disk_full(e):
                raise
            click.echo(f"error: {rundir.disk_full_message(e)}", err=True)
            sys.exit(2)

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
        "deterministic": "train.deterministic", "allow_leakage": "data.allow_leakage",
        "precision": "train.precision", "jit_compile": "train.jit_compile",
        "distribute": "train.distribute",
    }
    out: dict = {}
    for flag, value in flags.items():
        if value is not None:
            set_dotted(out, mapping[flag], value)
    return out


_PRECISION = click.option(
    "--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
    help="Compute dtype: auto (default) is mixed_float16 on a GPU, float32 on a CPU; the softmax "
         "stays float32.")
_JIT_COMPILE = click.option(
    "--jit-compile", type=click.Choice(["auto", "on", "off"]),
    help="XLA compilation of the training step; auto (default) is Keras' choice.")


@main.command()
@click.argument("data", required=False)
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
@click.option("--deterministic", is_flag=True, default=None,
              help="TensorFlow op determinism: identical reruns, slower.")
@click.option("--allow-leakage", is_flag=True, default=None,
              help="Train even when a byte-identical image sits in two splits (it inflates the "
                   "test scores).")
@_PRECISION
@_JIT_COMPILE
@click.option("--distribute", type=click.Choice(["none", "mirrored", "multi_worker"]),
              help="none (default); mirrored: all local GPUs; multi_worker: the machines of "
                   "TF_CONFIG. --batch-size is per replica.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --run-dir.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --run-dir from its last epoch, with its saved "
                   "config (DATA may be left out).")
@_handle_errors
def fit(data, run_dir, config_file, overwrite, resume, **flags):
    """Train a classifier on DATA: a folder of class subfolders, a folder with train/ [val/]
    [test/], a CSV manifest (path,label[,group][,split]), or tfds:NAME[:SPLIT]."""
    from jewelclf.config import resolve
    from jewelclf.training import fit as run_fit
    from jewelclf.training import resume_fit

    if resume:
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        if config_file:
            given.insert(0, "--config")
        if given or overwrite:
            raise JewelclfError(
                f"--resume continues the run with its saved config; drop "
                f"{', '.join(given or ['--overwrite'])}, or start a new run in another --run-dir")
        resume_fit(run_dir, data, log=click.echo)
        return
    if data is None:
        raise JewelclfError("missing DATA: give the folder, CSV manifest or tfds:NAME to train on "
                            "(or --resume to continue a run)")
    config = resolve(config_file, _overrides(**flags))
    run_fit(data, run_dir, config, overwrite=overwrite, log=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", type=click.Path(path_type=Path),
              help="Folder for metrics.json and plots (default: RUN_DIR/evaluations/<data>).")
@click.option("--split", type=click.Choice(["train", "val", "test"]),
              help="Which split to score. On the data the run trained on: the run's own split "
                   "from splits.csv (default test, else val; train only when asked). On other "
                   "data: DATA's split (default test if DATA has one, else all of it).")
@_handle_errors
def evaluate(run_dir, data, output, split):
    """Evaluate the model of RUN_DIR on DATA: per-class metrics and a confusion matrix."""
    from jewelclf.evaluation import evaluate_run, format_report

    metrics, out_dir = evaluate_run(run_dir, data, output, split)
    click.echo(format_report(metrics))
    if metrics.get("rejected_files"):
        click.echo(f"{metrics['rejected_files']} unreadable file(s) left out: {out_dir / 'rejected_files.csv'}")
    click.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'confusion_matrix.png'}")


# --- export and predict (issue #4) ------------------------------------------------------------


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "tflite", "keras"]),
              default="savedmodel", show_default=True, help="What to write.")
@click.option("--output", type=click.Path(path_type=Path),
              help="savedmodel: the model's base folder, versions go inside (default "
                   "exported_models/<run dir name>); tflite/keras: a folder (default "
                   "exported_models/<run dir name>_tflite or _keras).")
@click.option("--version", type=int, help="savedmodel: the version number (default: the next one).")
@click.option("--quantize", multiple=True,
              type=click.Choice(["none", "float16", "dynamic", "int8", "all"]),
              help="tflite: quantization mode; repeat it or pass 'all' to compare modes (default none).")
@click.option("--test-data", help="A labelled folder or manifest: report the export's accuracy on it "
                                  "next to the Keras model's (its test split if it has one).")
@click.option("--parity-data", help="Labelled images for the parity check, if the run's data moved.")
@click.option("--embed-layer", type=click.Choice(["pool", "hidden"]), default="pool",
              show_default=True,
              help="savedmodel: the embedding the 'embed' signature serves; use the --layer your "
                   "`jewelclf index` was built with.")
@click.option("--overwrite", is_flag=True, help="tflite/keras: replace files already in --output.")
@_handle_errors
def export(run_dir, fmt, output, version, quantize, test_data, parity_data, embed_layer, overwrite):
    """Export the model of RUN_DIR: a TensorFlow Serving SavedModel (image bytes in, class names
    out), TFLite files, or a .keras copy. The export is checked against the Keras model."""
    from jewelclf.export import export_run, format_export_summary

    report = export_run(run_dir, fmt, output, version, quantize, test_data, parity_data, overwrite,
                        log=click.echo, embed_layer=embed_layer)
    click.echo(format_export_summary(report))


@main.command()
@click.argument("paths", nargs=-1, metavar="MODEL IMAGE_OR_DIR...")
@click.option("--top-k", type=int, help="Classes to show per image (default: the model's top-k).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--server", help="TF Serving REST address, e.g. http://localhost:8501 (then no MODEL).")
@click.option("--model", "server_model", help="With --server: the model name TF Serving serves.")
@click.option("--version", type=int, help="With --server: ask for this model version.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per request.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="With --server: seconds per request.")
@_handle_errors
def predict(paths, top_k, as_json, server, server_model, version, batch_size, timeout):
    """Predict classes of images or folders of images with MODEL (an exported SavedModel, a
    .keras or .tflite file, or a run dir), or with --server URL --model NAME through TF Serving."""
    import json as json_mod

    from jewelclf.predict import format_table, run_predict

    model, images = (None, list(paths)) if server else ((paths[0] if paths else None), list(paths[1:]))
    results, _ = run_predict(model, images, top_k, server, server_model, version, batch_size, timeout)
    for r in results:
        if r.error is not None:
            click.echo(f"skipped {r.image}: {r.error}", err=True)
    if as_json:
        click.echo(json_mod.dumps([r.to_dict() for r in results], indent=2))
    elif any(r.error is None for r in results):
        click.echo(format_table(results))
    if all(r.error is not None for r in results):
        raise JewelclfError(f"none of the {len(results)} image(s) could be predicted; see the lines above")


# --- visual search (issue #7): jewelclf index / jewelclf similar -------------------------------


@main.command("index")
@click.argument("model", metavar="RUN_DIR_OR_MODEL")
@click.argument("catalogue", metavar="CATALOGUE_DIR_OR_CSV")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Index folder; an index already there is updated incrementally.")
@click.option("--batch-size", type=int, help="Images per embedding batch (default: the run's).")
@click.option("--layer", type=click.Choice(["pool", "hidden"]), default="pool", show_default=True,
              help="Embed the pooled backbone features, or the head's hidden layer.")
@click.option("--exact-threshold", type=int,
              help="Search exactly up to this many items, through an HNSW graph above (default 50000).")
@click.option("--rebuild", is_flag=True, help="Re-embed everything (needed after changing model or layer).")
@_handle_errors
def index_command(model, catalogue, output, batch_size, layer, exact_threshold, rebuild):
    """Embed the photos of CATALOGUE_DIR_OR_CSV (class subfolders, or a CSV path,label[,group|sku])
    with a trained model and write a search index; a second run embeds only new or changed
    files and drops the ones that are gone."""
    from jewelclf.search import build_index

    summary = build_index(model, catalogue, output, batch_size, layer, exact_threshold, rebuild,
                          log=click.echo)
    for note in summary.notes:
        click.echo(f"note: {note}")
    click.echo(summary.describe())


@main.command("similar")
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--k", "k", type=int, default=10, show_default=True, help="Items per query image.")
@click.option("--same-class", is_flag=True, help="Only items labelled with the query's predicted class.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--html", "html_out", type=click.Path(path_type=Path),
              help="Also write a page of thumbnails to this .html file.")
@_handle_errors
def similar_command(index_dir, images, k, same_class, as_json, html_out):
    """Find the catalogue items of INDEX_DIR most similar to each IMAGE (cosine similarity)."""
    import json as json_mod

    from jewelclf.search import format_similar, similar

    report = similar(index_dir, list(images), k, same_class)
    for e in report.errors:
        click.echo(f"skipped {e['query']}: {e['error']}", err=True)
    click.echo(json_mod.dumps(report.to_dict(), indent=2) if as_json else format_similar(report))
    if html_out:
        from jewelclf.search_report import write_html

        click.echo(f"wrote {write_html(report, html_out)}", err=as_json)


# --- hyperparameter search (issue #3): jewelclf tune ---------------------------------------------


@main.command("tune")
@click.argument("data")
@click.option("--run-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the search state, trials.csv, best_config.yaml and the report.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file of config overrides: the base every trial starts from.")
@click.option("--tuner", type=click.Choice(["hyperband", "random", "bayesian"]),
              help="keras-tuner search algorithm (default: hyperband).")
@click.option("--max-trials", type=int,
              help="Trials at most (default: 20 for random/bayesian, Hyperband's own schedule).")
@click.option("--objective", type=click.Choice(["val_accuracy", "val_macro_f1"]),
              help="What the search maximises, on the validation split (default: val_accuracy).")
@click.option("--executions-per-trial", type=int, help="Trainings per trial, averaged (default: 1).")
@click.option("--resume", is_flag=True,
              help="Continue the search in --run-dir after an interruption; finished trials are kept.")
@click.option("--space", "space_file", type=click.Path(path_type=Path),
              help="YAML file of search-space ranges that replace the defaults.")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Compute the frozen backbone's features once for all trials (when stage 1 has "
                   "no augmentation).")
@_PRECISION
@_JIT_COMPILE
@click.option("--overwrite", is_flag=True, help="Replace a search already in --run-dir.")
@_handle_errors
def tune_command(data, run_dir, config_file, space_file, resume, precision, jit_compile, **settings):
    """Search the head size, dropout, both stages' learning rates, how many blocks to unfreeze
    and augmentation strength with Keras Tuner; write best_config.yaml for `jewelclf fit`."""
    from jewelclf.config import resolve
    from jewelclf.tuning import load_space, tune

    overrides = _overrides(precision=precision, jit_compile=jit_compile)
    if resume and overrides:
        given = [f for f, v in (("--precision", precision), ("--jit-compile", jit_compile)) if v]
        raise JewelclfError(f"--resume continues the search with its saved config; drop "
                            f"{', '.join(given)}, or start a new search in another --run-dir")
    config = resolve(config_file, overrides) if config_file or not resume else None
    space = load_space(space_file) if space_file else None
    tune(data, run_dir, config, space, resume=resume, log=click.echo, **settings)


# ---------------------------------------------------------------- jewelclf check (issue #6)
@main.command("check")
@click.argument("data")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the JSON report to this file.")
@click.option("--backbone", help="List images smaller than this backbone's default input side.")
@click.option("--image-size", type=click.IntRange(min=1),
              help="List images smaller than this input side (wins over --backbone's default).")
@click.option("--near-distance", "near_duplicate_distance", type=click.IntRange(0, 256),
              help="Largest pHash distance, in bits of 256, between near duplicates (default 12).")
@click.option("--workers", type=click.IntRange(min=1), help="Files checked in parallel (default 4).")
@_handle_errors
def check_command(data, as_json, output, **settings):
    """Decode every file of DATA and report class counts and imbalance, unreadable files,
    extensions that lie, byte-identical and near-identical duplicates (within a split and
    across splits), images smaller than the input, and EXIF-rotated photos.

    Exit status: 0 when nothing was found, 1 when something was, 2 for a usage error or a DATA
    that cannot be read at all."""
    import json

    from jewelclf.data.report import (NEAR_DUPLICATE_DISTANCE, check_data, format_check_report,
                                      save_check_report)

    if settings["near_duplicate_distance"] is None:
        settings["near_duplicate_distance"] = NEAR_DUPLICATE_DISTANCE
    report = check_data(data, **settings)
    if output:
        save_check_report(report, output)
    click.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_check_report(report))
    if output and not as_json:
        click.echo(f"wrote {output}")
    sys.exit(0 if report["clean"] else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
