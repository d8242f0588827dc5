"""Resumable training: which phases of a run are done, and what to continue from.

A run trains in phases: ``stage1`` (the head), then ``stage2.1``, ``stage2.2``... (one per
unfreezing step). Two Keras mechanisms make a killed run resumable, at any point:

- within a phase, :class:`keras.callbacks.BackupAndRestore` saves the model's weights, the
  optimizer's state (its learning rate included, as ReduceLROnPlateau left it) and the epoch at
  every epoch's end, and restores them when the phase's ``fit`` starts again;
- when a phase ends, its weights are saved as ``resume/after_<phase>.weights.h5`` and the phase
  is marked done in ``resume/state.json`` (in that order, each write atomic), so a resumed run
  skips it and starts the next phase from exactly those weights.

Stage 1's frozen-backbone features are kept in ``resume/features.npz``, so a resume does not
pay for that pass again. The whole ``resume/`` folder is removed when the run finishes.

The SHA-256 of every image the run trains on (taken by the data check from the bytes it reads)
is kept in ``resume/content.json``: a resume refuses images whose contents changed
(:func:`changed_content`), since the epochs already trained, and the cached features, are of
the old contents.

Keras saves no random state with the weights, so both saves above also keep the states of the
model's seed generators (its dropout and augmentation layers, :func:`seed_states`): a resumed
run draws the dropout masks and augmentations that the uninterrupted run would have drawn.

Every file here is replaced atomically (a temp file, then a rename), Keras' per-epoch backup
included (:class:`AtomicBackupAndRestore`): a full disk or a kill in the middle of a save leaves
the previous file whole. :class:`AtomicModelCheckpoint` does the same for best-weights files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from jewelclf import compat, fsio

RESUME_DIR = "resume"
STATE = "state.json"
FEATURES = "features.npz"
CONTENT = "content.json"


def _link_over(src: str, dst: str) -> None:
    """Make ``dst`` a second name of ``src`` (no copy, so no disk space), replacing ``dst``
    atomically; a copy where the file system has no hard links."""
    if not os.path.exists(src):
        return
    tmp = f"{dst}.tmp-link"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def weights_bytes(model: keras.Model) -> int:
    """About the size of ``model.save_weights``'s file: the model's and its optimizer's variables,
    plus HDF5's overhead. Lets :func:`jewelclf.fsio.atomic_save` refuse a save the disk has no
    room for before HDF5 starts it (HDF5 does not recover from a full disk met part-way)."""
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    raw = sum(int(np.prod(v.shape)) * np.dtype(getattr(v.dtype, "name", v.dtype)).itemsize
              for v in variables)
    return raw + raw // 20 + 2048 * len(variables) + 16 * 1024  # ~1.3 KB a dataset in HDF5


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' ``BackupAndRestore`` with every file replaced atomically.

    Keras rewrites ``latest.weights.h5`` and ``training_metadata.json`` in place: a full disk
    (or a kill) during the write leaves a truncated file, or one that opens and loads without
    the optimizer's state, or not at all with a ``ValueError`` that its ``.bkp`` fallback does
    not catch. Here the new weights are written beside the old ones and renamed over them; with
    ``double_checkpoint`` the previous pair becomes the ``.bkp`` pair by hard links (no copy).
    A full disk raises :class:`jewelclf.fsio.DiskFullError` and leaves the previous backup
    byte for byte. Restoring is Keras' own, ``.bkp`` fallback included.

    Every ``fit`` starts at the epoch its own backup holds, and at epoch 0 without one (see
    :func:`jewelclf.compat.forget_restored_epoch`).
    """

    def on_train_begin(self, logs=None):
        compat.forget_restored_epoch(self.model)
        super().on_train_begin(logs)
        try:  # the pair Keras restored (its .bkp fallback copies over this one)
            meta = json.loads(Path(self._training_metadata_path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        set_seed_states(self.model, meta.get("seeds") if isinstance(meta, dict) else None)

    def on_train_end(self, logs=None):
        compat.forget_restored_epoch(self.model)
        super().on_train_end(logs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        meta = Path(self._training_metadata_path)
        meta_tmp = meta.with_name(f".tmp-{meta.name}")

        def save(tmp):
            # Both new files are written whole before either is renamed, so a full disk leaves
            # the previous pair as it was; only the two renames (no space needed) remain after.
            try:
                self.model.save_weights(tmp, overwrite=True)
                with open(meta_tmp, "w", encoding="utf-8") as f:
                    f.write(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                        "seeds": seed_states(self.model)}))
                    f.flush()
                    os.fsync(f.fileno())
                if self.double_checkpoint:  # the pair being replaced becomes the .bkp pair
                    _link_over(self._weights_path, self._prev_weights_path)
                    _link_over(self._training_metadata_path, self._prev_training_metadata_path)
            except BaseException:
                meta_tmp.unlink(missing_ok=True)
                raise

        fsio.atomic_save(Path(self._weights_path), save, _expected(self._weights_path, self.model))
        os.replace(meta_tmp, meta)


def seed_states(model: keras.Model) -> list[list[int]]:
    """The states of ``model``'s seed generators, in a fixed order (JSON-ready)."""
    return [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in compat.seed_variables(model)]


def set_seed_states(model: keras.Model, states: list | None) -> None:
    """Put back :func:`seed_states` of the same model; ``None`` or another model's leave it."""
    variables = compat.seed_variables(model)
    if not isinstance(states, list) or len(states) != len(variables):
        return
    for v, state in zip(variables, states):
        v.assign(np.asarray(state, dtype=keras.backend.standardize_dtype(v.dtype)))


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' ``ModelCheckpoint`` writing through :func:`jewelclf.fsio.atomic_save`.

    Keras overwrites the checkpoint in place, so a full disk during the save of a new best
    destroys the previous best. Here the new file is written beside it and renamed over it; a
    full disk raises :class:`jewelclf.fsio.DiskFullError` and keeps the previous best intact.
    ``saves``: the model whose weights are saved when it is not the one being fitted (a cached
    stage-2 step fits the classifier's top, which shares its layers; the checkpoint is the
    whole classifier's).
    """

    def __init__(self, *args, saves: keras.Model | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves = saves

    def set_model(self, model):
        super().set_model(self.saves if self.saves is not None else model)

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        expected = _expected(filepath, self.model)
        if self.save_weights_only:
            fsio.atomic_save(Path(filepath), lambda tmp: self.model.save_weights(tmp, overwrite=True), expected)
        else:
            fsio.atomic_save(Path(filepath), lambda tmp: self.model.save(tmp, overwrite=True), expected)


def _expected(path, model: keras.Model) -> int:
    """The larger of the file being replaced and :func:`weights_bytes` of ``model``."""
    previous = os.path.getsize(path) if os.path.isfile(path) else 0
    return max(previous, weights_bytes(model))


class Progress:
    """The training progress of one run dir, persisted so that ``fit --resume`` can continue."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / RESUME_DIR
        state_path = self.dir / STATE
        self.state: dict[str, Any] = {"done": {}, "values": {}}
        if state_path.is_file():
            self.state = json.loads(state_path.read_text(encoding="utf-8"))

    # --- phases -------------------------------------------------------------------------------

    def done(self, phase: str) -> dict[str, Any] | None:
        """The summary of ``phase`` if it finished, else ``None``."""
        return self.state["done"].get(phase)

    @property
    def last_done(self) -> str | None:
        return next(reversed(self.state["done"]), None)

    def backup(self, phase: str) -> keras.callbacks.BackupAndRestore:
        """The per-epoch backup of ``phase``; it restores itself when the phase restarts."""
        # Kept after fit returns (delete_checkpoint=False): it is removed only once the phase is
        # marked done, so no moment exists where neither the backup nor the phase's end is saved.
        return AtomicBackupAndRestore(str(self.dir / phase), double_checkpoint=True,
                                      delete_checkpoint=False)

    def backed_up_epochs(self, phase: str) -> int:
        """How many epochs of ``phase`` its backup holds (0 when it has none).

        When ``latest.weights.h5`` cannot be opened, Keras restores the ``.bkp`` pair instead
        (its fallback on ``OSError``), so that pair's epoch is the one training resumes after.
        """
        folder = self.dir / phase
        meta, weights = folder / "training_metadata.json", folder / "latest.weights.h5"
        if weights.is_file() and not _opens_as_hdf5(weights) and (folder / f"{weights.name}.bkp").is_file():
            meta = folder / f"{meta.name}.bkp"
        try:
            return int(json.loads(meta.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def complete(self, phase: str, model: keras.Model, summary: dict[str, Any]) -> None:
        """Save the weights at the end of ``phase``, then mark it done."""
        previous = self.last_done
        weights = self.dir / f"after_{phase}.weights.h5"
        fsio.atomic_save(weights, model.save_weights, _expected(weights, model))
        self.state["done"][phase] = {**summary, "weights": weights.name}
        self.state.setdefault("seeds", {})[phase] = seed_states(model)
        self._save()
        shutil.rmtree(self.dir / phase, ignore_errors=True)
        if previous and previous != phase:
            (self.dir / f"after_{previous}.weights.h5").unlink(missing_ok=True)

    def restore(self, model: keras.Model) -> str | None:
        """Load the weights saved at the end of the last finished phase; return its name."""
        phase = self.last_done
        if phase is None:
            return None
        with warnings.catch_warnings():
            # The file also holds the optimizer of the phase that saved it; only weights matter.
            warnings.simplefilter("ignore")
            model.load_weights(self.dir / self.state["done"][phase]["weights"])
        set_seed_states(model, self.state.get("seeds", {}).get(phase))
        return phase

    # --- values that must survive a restart ---------------------------------------------------

    def value(self, key: str, default: Any = None) -> Any:
        return self.state["values"].get(key, default)

    def set_value(self, key: str, value: Any) -> None:
        self.state["values"][key] = value
        self._save()

    # --- stage-1 features ---------------------------------------------------------------------

    def load_features(self, n_train: int, n_val: int) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.dir / FEATURES
        if not path.is_file():
            return None
        try:
            with np.load(path) as f:
                train, val = f["train"], f["val"]
        except (OSError, ValueError, KeyError):
            return None
        if len(train) != n_train or len(val) != n_val:
            return None
        return train, val

    def save_features(self, features: tuple[np.ndarray, np.ndarray]) -> None:
        fsio.atomic_save(self.dir / FEATURES,
                       lambda tmp: np.savez(tmp, train=features[0], val=features[1]))

    # --- the end of a run ---------------------------------------------------------------------

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _save(self) -> None:
        fsio.atomic_write_json(self.dir / STATE, self.state)


def save_content(run_dir: Path, hashes: dict[str, str]) -> None:
    """Record the content hashes (file key -> SHA-256) of a new run's images."""
    fsio.atomic_write_json(Path(run_dir) / RESUME_DIR / CONTENT, {"sha256": hashes})


def changed_content(run_dir: Path, hashes: dict[str, str]) -> tuple[list[str] | None, Path]:
    """The keys of the images whose hash differs from :func:`save_content`'s record (sorted;
    ``None`` when there is no readable record: an older jewelclf started the run), and the
    record's path."""
    path = Path(run_dir) / RESUME_DIR / CONTENT
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        return sorted(k for k, sha in hashes.items() if recorded.get(k, sha) != sha), path
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, path


def _opens_as_hdf5(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r"):
            return True
    except OSError:
        return False


def trim_history(history: Path, progress: Progress) -> None:
    """Drop the rows of epochs that a resumed run will train again.

    Rows of finished phases stay; of an unfinished phase, only as many as its backup holds.
    """
    if not history.is_file():
        return
    with open(history, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept, seen = [], {}
    for row in rows:
        phase = row["phase"]
        seen[phase] = seen.get(phase, 0) + 1
        if progress.done(phase) is not None or seen[phase] <= progress.backed_up_epochs(phase):
            kept.append(row)
    if len(kept) == len(rows):
        return
    import io

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    fsio.atomic_write_text(history, out.getvalue())
