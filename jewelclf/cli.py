"""The ``jewelclf`` command line. Each command loads config, applies flags, calls one function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from jewelclf.cli_options import (
    BACKBONE,
    IMAGE_SIZE,
    VERBOSE,
    config_flag,
    handle_errors,
    model_and_data_flags,
    overrides,
    refuse_with_resume,
    start,
    tta_option,
)
from jewelclf.errors import JewelclfError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="jewelclf")
def main():
    """Turn a folder of product photos into a production image classifier."""


@main.command()
@click.argument("data", required=False)
@click.option("--run-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for this run's config, model, history and metrics.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file of config overrides (flags override it in turn).")
@model_and_data_flags
@config_flag("--unfreeze-blocks", "train.stage2.unfreeze_blocks",
             "How many top backbone blocks stage 2 unfreezes, one more per step.", type=int)
@config_flag("--learning-rate", "train.stage1.learning_rate", "Stage-1 learning rate (Adam).",
             type=float)
@config_flag("--fine-tune-learning-rate", "train.stage2.learning_rate",
             "Stage-2 learning rate (Adam).", type=float)
@config_flag("--head-units", "model.head_units", "Hidden Dense units in the head (0: none).",
             type=int)
@config_flag("--dropout", "model.dropout",
             "Dropout rate before the softmax (and after the hidden layer).", type=float)
@config_flag("--augment/--no-augment", "augment.enabled", "Training-time augmentation (stage 2).")
@config_flag("--target-accuracy", "train.target_accuracy",
             "Validation accuracy the review threshold is chosen for: images below it need "
             "review.", type=float)
@config_flag("--distribute", "train.distribute",
             "mirrored: all local GPUs; multi_worker: the machines of TF_CONFIG. --batch-size "
             "is per replica.", type=click.Choice(["none", "mirrored", "multi_worker"]))
@click.option("--overwrite", is_flag=True, help="Replace a run already in --run-dir.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --run-dir from its last epoch, with its saved "
                   "config (DATA may be left out).")
@VERBOSE
@handle_errors
def fit(data, run_dir, config_file, overwrite, resume, verbose, **flags):
    """Train a classifier on DATA: a folder of class subfolders, a folder with train/ [val/]
    [test/], a CSV manifest (path,label[,group][,split]), or tfds:NAME[:SPLIT]."""
    from jewelclf.config import resolve

    if resume:
        refuse_with_resume("run", config_file, flags, overwrite)
        start(verbose, data)
        from jewelclf.training.fit import resume_fit

        resume_fit(run_dir, data, log=click.echo)
        return
    if data is None:
        raise JewelclfError("missing DATA: give the folder, CSV manifest or tfds:NAME to train on "
                            "(or --resume to continue a run)")
    config = resolve(config_file, overrides(**flags))
    start(verbose, data)
    from jewelclf.training.fit import fit as run_fit

    run_fit(data, run_dir, config, overwrite=overwrite, log=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", type=click.Path(path_type=Path),
              help="Folder for metrics.json and plots (default: "
                   "RUN_DIR/evaluations/<split>_<data folder name>).")
@click.option("--split", type=click.Choice(["train", "val", "test"]),
              help="Which split to score. On the data the run trained on: the run's own split "
                   "from splits.csv (default test, else val; train only when asked). On other "
                   "data: DATA's split (default test if DATA has one, else all of it).")
@click.option("--unknown", type=click.Path(path_type=Path),
              help="A folder of photos of classes the run was never trained on (any layout): "
                   "report how well k-NN distance to the training images flags them.")
@tta_option("Test-time augmentation: score the probabilities averaged over each image and its "
            "horizontal flip (two passes per image); metrics.json records tta.")
@VERBOSE
@handle_errors
def evaluate(run_dir, data, output, split, unknown, tta, verbose):
    """Evaluate the model of RUN_DIR on DATA: per-class metrics and a confusion matrix."""
    start(verbose, data, run_dir)
    from jewelclf.evaluation.evaluate import evaluate_run, format_summary

    metrics, out_dir = evaluate_run(run_dir, data, output, split, unknown, tta)
    click.echo(format_summary(metrics))
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
@click.option("--review-threshold", type=float, default=None,
              help="The calibrated confidence below which needs_review is true (default: the "
                   "run's, chosen on val for train.target_accuracy); 0 turns the confidence part off.")
@click.option("--overwrite", is_flag=True, help="tflite/keras: replace files already in --output.")
@tta_option("savedmodel/tflite: bake test-time augmentation into the classifying answer, the "
            "probabilities averaged over each image and its horizontal flip (two passes per "
            "image); embed is unchanged.")
@VERBOSE
@handle_errors
def export(run_dir, fmt, output, version, quantize, test_data, parity_data, embed_layer,
           review_threshold, overwrite, tta, verbose):
    """Export the model of RUN_DIR: a TensorFlow Serving SavedModel (image bytes in, class names
    out), TFLite files, or a .keras copy. The export is checked against the Keras model."""
    start(verbose, run_dir=run_dir)
    from jewelclf.export.run import export_run, format_export_summary

    report = export_run(run_dir, fmt, output, version, quantize, test_data, parity_data, overwrite,
                        log=click.echo, embed_layer=embed_layer, review_threshold=review_threshold, tta=tta)
    click.echo(format_export_summary(report))


@main.command()
@click.argument("paths", nargs=-1, metavar="MODEL IMAGE_OR_DIR...")
@click.option("--top-k", type=int, help="Classes to show per image (default: the model's top-k).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--server", help="TF Serving REST address, e.g. http://localhost:8501 (then no MODEL).")
@click.option("--model", "server_model", help="With --server: the model name TF Serving serves.")
@click.option("--version", type=int, help="With --server: ask for this model version.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per request.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="With --server: seconds for each whole request, connect to last byte.")
@tta_option("A .keras model or run dir: average the probabilities over each image and its "
            "horizontal flip (two passes per image); an export answers as exported (export --tta).")
@VERBOSE
@handle_errors
def predict(paths, top_k, as_json, server, server_model, version, batch_size, timeout, tta, verbose):
    """Predict classes of images or folders of images with MODEL (an exported SavedModel, a
    .keras or .tflite file, or a run dir), or with --server URL --model NAME through TF Serving."""
    import json as json_mod

    from jewelclf.display import quote_name
    from jewelclf.inference.predict import format_table, run_predict

    model, images = (None, list(paths)) if server else ((paths[0] if paths else None), list(paths[1:]))
    if not server:  # TF Serving does the work behind --server: no TensorFlow here
        if model is not None and not Path(model).exists():
            raise JewelclfError(f"model '{model}' does not exist; pass an exported SavedModel "
                                f"folder, a .keras or .tflite file, or a run dir")
        start(verbose)
    results, _ = run_predict(model, images, top_k, server, server_model, version, batch_size, timeout, tta)
    for r in results:
        if r.error is not None:
            click.echo(f"skipped {quote_name(r.image)}: {r.error}", err=True)
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
@VERBOSE
@handle_errors
def index_command(model, catalogue, output, batch_size, layer, exact_threshold, rebuild, verbose):
    """Embed the photos of CATALOGUE_DIR_OR_CSV (class subfolders, or a CSV path,label[,group|sku])
    with a trained model and write a search index; a second run embeds only new or changed
    files and drops the ones that are gone."""
    start(verbose, catalogue)
    from jewelclf.search.build import build_index

    summary = build_index(model, catalogue, output, batch_size, layer, exact_threshold, rebuild,
                          log=click.echo)
    for note in summary.notes:
        click.echo(f"note: {note}")
    click.echo(summary.describe())


@main.command("similar")
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", "--k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Items per query image (--k is the same).")
@click.option("--same-class", is_flag=True, help="Only items labelled with the query's predicted class.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--html", "html_out", type=click.Path(path_type=Path),
              help="Also write a page of thumbnails to this .html file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --html file.")
@VERBOSE
@handle_errors
def similar_command(index_dir, images, k, same_class, as_json, html_out, overwrite, verbose):
    """Find the catalogue items of INDEX_DIR most similar to each IMAGE (cosine similarity)."""
    import json as json_mod

    from jewelclf.search.index import require_index

    for note in require_index(index_dir):
        click.echo(f"note: {note}", err=True)
    if html_out:
        from jewelclf.search.html import check_html_path

        check_html_path(html_out, index_dir, overwrite)  # before the search, not after it
    start(verbose)

    from jewelclf.search.query import format_similar, similar

    report = similar(index_dir, list(images), k, same_class)
    for e in report.errors:
        click.echo(f"skipped {e['query']}: {e['error']}", err=True)
    click.echo(json_mod.dumps(report.to_dict(), indent=2) if as_json else format_similar(report))
    if html_out:
        from jewelclf.search.html import write_html

        click.echo(f"wrote {write_html(report, html_out, overwrite)}", err=as_json)


# --- label-error review (issue #18): jewelclf review -------------------------------------------


@main.command("review")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Folder for label_issues.csv, label_issues.html, "
                   "duplicate_label_conflicts.csv and review.json.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Stratified folds of the out-of-fold predictions (seeded by the run's seed).")
@click.option("--head", type=click.Choice(["keras", "logistic"]), default="keras",
              show_default=True,
              help="What the folds train on the stage-1 features: the run's own Keras head, or "
                   "scikit-learn's logistic regression.")
@click.option("--overwrite", is_flag=True, help="Replace a review already in --output.")
@VERBOSE
@handle_errors
def review_command(run_dir, data, output, folds, head, overwrite, verbose):
    """Rank the train and val images of RUN_DIR most likely to be mislabelled (confident
    learning on out-of-fold predictions, through cleanlab), with a contact sheet, and list
    near-duplicate images under different labels. DATA is the data the run trained on."""
    start(verbose, data, run_dir)
    from jewelclf.review.label_issues import format_summary, review_run

    summary = review_run(run_dir, data, output, overwrite=overwrite, folds=folds, head=head,
                         log=click.echo)
    click.echo(format_summary(summary, output))


# --- hyperparameter search (issue #3): jewelclf tune ---------------------------------------------


@main.command("tune")
@click.argument("data")
@click.option("--run-dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the search state, trials.csv, best_config.yaml and the report.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file of config overrides: the base every trial starts from (flags "
                   "override it in turn).")
@click.option("--tuner", type=click.Choice(["hyperband", "random", "bayesian"]),
              help="keras-tuner search algorithm.  [default: hyperband]")
@click.option("--max-trials", type=click.IntRange(min=1),
              help="Trials at most.  [default: 20 for random/bayesian, Hyperband's own schedule]")
@click.option("--objective", type=click.Choice(["val_accuracy", "val_macro_f1"]),
              help="What the search maximises, on the validation split.  [default: val_accuracy]")
@click.option("--executions-per-trial", type=click.IntRange(min=1),
              help="Trainings per trial from fresh weights; the trial scores their mean.  "
                   "[default: 1]")
@click.option("--space", "space_file", type=click.Path(path_type=Path),
              help="YAML file of search-space ranges that replace the defaults.")
@click.option("--fast/--no-fast", default=True, show_default=True,
              help="Compute the frozen backbone's features once for all trials (when stage 1 has "
                   "no augmentation).")
@model_and_data_flags
@click.option("--resume", is_flag=True,
              help="Continue the search in --run-dir after an interruption; finished trials are kept.")
@click.option("--overwrite", is_flag=True, help="Replace a search already in --run-dir.")
@VERBOSE
@handle_errors
def tune_command(data, run_dir, config_file, space_file, resume, verbose, tuner, max_trials,
                 objective, executions_per_trial, fast, overwrite, **flags):
    """Search the head size, dropout, both stages' learning rates, how many blocks to unfreeze
    and augmentation strength with Keras Tuner; write best_config.yaml for `jewelclf fit`.
    The model and data flags are fit's, with the same meaning; every trial starts from them."""
    from jewelclf.config import resolve

    if resume:  # a --config must match the saved one (tune checks); flags are refused
        refuse_with_resume("search", None, flags)
    config = resolve(config_file, overrides(**flags)) if config_file or not resume else None
    start(verbose)  # the space file is checked before DATA, as tune always did
    from jewelclf.tuning.tune import load_space, tune

    space = load_space(space_file) if space_file else None
    tune(data, run_dir, config, space, resume=resume, log=click.echo, tuner=tuner,
         max_trials=max_trials, objective=objective, executions_per_trial=executions_per_trial,
         fast=fast, overwrite=overwrite)


# ---------------------------------------------------------------- jewelclf check
@main.command("check")
@click.argument("data")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="The YAML config of the fit to come: its image size (or its backbone's), "
                   "pixel limits and workers apply.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the JSON report to this file.")
@BACKBONE
@IMAGE_SIZE
@click.option("--near-distance", "near_duplicate_distance", type=click.IntRange(0, 256),
              help="Largest pHash distance, in bits of 256, between near duplicates.  "
                   "[default: 12]")
@click.option("--workers", type=click.IntRange(min=1),
              help="Files checked in parallel.  [default: the config's data.check_workers, 4]")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
@VERBOSE
@handle_errors
def check_command(data, config_file, as_json, output, near_duplicate_distance, workers, strict,
                  verbose, **flags):
    """Decode every file of DATA and report class counts and imbalance, unreadable files,
    extensions that lie, byte-identical and near-identical duplicates (within a split and
    across splits), images smaller than the model's input, and EXIF-rotated photos.

    Exit status: 0 when no error was found (warnings only), 1 on errors (a byte-identical copy
    in two splits, one image under two labels, a class with no usable image) or, with
    --strict, on warnings; 2 for a usage error or a DATA that cannot be read at all."""
    import json

    from jewelclf.config import resolve

    config = resolve(config_file, overrides(**flags))
    start(verbose, data)
    from jewelclf.data.audit import NEAR_DUPLICATE_DISTANCE, check_data, format_check_report, save_check_report

    if near_duplicate_distance is None:
        near_duplicate_distance = NEAR_DUPLICATE_DISTANCE
    report = check_data(data, backbone=config.model.backbone, image_size=config.data.image_size,
                        near_duplicate_distance=near_duplicate_distance,
                        workers=workers or config.data.check_workers,
                        max_pixels=config.data.max_pixels, min_side=config.data.min_image_side)
    if output:
        save_check_report(report, output)
    click.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_check_report(report))
    if output and not as_json:
        click.echo(f"wrote {output}")
    sys.exit(1 if report["errors"] or (strict and report["warnings"]) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
