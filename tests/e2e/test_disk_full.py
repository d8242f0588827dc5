"""A full disk during a save (issue #6, "Reliability"): the previous checkpoint, backup and export
stay intact, nothing half-written is left where it would be read, the user gets one line naming
the file and the fix, and ``fit --resume`` continues once space is freed.

The disk is filled by simulation: the writer (Keras' ``save_weights``/``save``, the SavedModel
writer, or the text writer's ``fsync``) first writes part of what it would have written to the
path it was given, then fails with ``OSError(ENOSPC)`` (or TensorFlow's
``ResourceExhaustedError "...; No space left on device"``), as a real full disk does. Without
the atomic writes, that partial file is the checkpoint itself.

The same failures on a real full disk (a 256 KB tmpfs) were checked by hand; see
TESTING.md for what Keras' own callbacks do there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from jewelclf import fsio
from jewelclf import runs as rd
from jewelclf.cli import main
from jewelclf.export import layout
from jewelclf.export import savedmodel as ex
from jewelclf.training import checkpoints as progress_mod

from conftest import make_split_folder

# tiny_cnn; enough stage-1 epochs that a backup with a .bkp exists before the save that fails.
FLAGS = ["--backbone", "tiny_cnn", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--epochs", "4", "--fine-tune-epochs", "2", "--unfreeze-blocks", "1",
         "--learning-rate", "0.01", "--fine-tune-learning-rate", "0.001", "--seed", "7"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digests(folder: Path, subdirs=("checkpoints", "resume")) -> dict[str, str]:
    """sha256 of every file under ``folder/<subdir>``, by relative path."""
    out = {}
    for sub in subdirs:
        for p in sorted((folder / sub).rglob("*")):
            if p.is_file():
                out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temp files of the atomic writers (``.tmp-*``, ``.*.tmp``, ``*.tmp-link``)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.name.startswith(".tmp-") or p.name.endswith((".tmp", ".tmp-link")))


def one_error_line(result) -> str:
    """The command failed with exit 2 and exactly one line on stderr, ``error: ...``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class FullDisk:
    """Make one call of ``keras.Model.<method>`` hit a full disk, part-way through its write.

    ``when(path, n)`` picks the call (``n``: how many calls so far matched ``match``). That call
    records ``digests(run_dir)`` first, then writes the first half of the real file to the path
    it was given and raises ENOSPC, as ``h5py``/``zipfile`` do when the disk fills up.
    """

    def __init__(self, monkeypatch, method: str, match, nth: int = 1, run_dir: Path | None = None):
        self.fired = False
        self.before: dict[str, str] | None = None
        self.path: Path | None = None
        real = getattr(keras.Model, method)
        seen = []

        def fake(model, filepath, *args, **kwargs):
            path = Path(str(filepath))
            if not self.fired and match(path):
                seen.append(path)
                if len(seen) == nth:
                    self.fired, self.path = True, path
                    if run_dir is not None:
                        self.before = digests(run_dir)
                    with tempfile.TemporaryDirectory() as scratch:
                        whole = Path(scratch) / path.name
                        real(model, whole, *args, **kwargs)
                        data = whole.read_bytes()
                    with open(path, "wb") as f:  # h5py opens with "w": the old content is gone
                        f.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(model, filepath, *args, **kwargs)

        monkeypatch.setattr(keras.Model, method, fake)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("disk_full") / "data", train=12, val=4, test=4)


def history_epochs(run_dir: Path) -> list[int]:
    import csv

    with open(run_dir / "history.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def assert_resumes(run_dir: Path, expect: str | None = None) -> str:
    result = run("fit", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, (result.output, result.exception)
    if expect:
        assert expect in result.output, result.output
    epochs = history_epochs(run_dir)
    assert epochs == list(range(1, len(epochs) + 1))  # no gap, no repeat
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and (run_dir / "model.keras").is_file()
    keras.saving.load_model(run_dir / "model.keras", compile=False)
    return result.output


# --------------------------------------------------------------------------------------------
# fit: the saves of a run


def test_disk_full_at_a_phase_checkpoint_keeps_the_previous_files_and_resumes(data, tmp_path, monkeypatch):
    """The end of stage 1 (``resume/after_stage1.weights.h5``, through ``atomic_save``)."""
    run_dir = tmp_path / "run"
    disk = FullDisk(monkeypatch, "save_weights", lambda p: p.name.endswith("after_stage1.weights.h5"),
                    run_dir=run_dir)
    line = one_error_line(run("fit", data, "--run-dir", run_dir, *FLAGS))
    assert disk.fired
    target = run_dir / "resume" / "after_stage1.weights.h5"
    assert line.startswith(f"error: no space left on device while writing '{target}' (")
    assert "nothing was written there" in line and "free disk space" in line
    assert line.endswith(f"then resume with: jewelclf fit --resume --run-dir {run_dir}")
    assert digests(run_dir) == disk.before  # checkpoints/, resume/ byte for byte
    assert not target.exists() and leftovers(run_dir) == []
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "running"
    monkeypatch.undo()
    assert_resumes(run_dir, "stage 1: resuming after epoch")


def _stop_in_an_epoch_backup(data: Path, run_dir: Path, monkeypatch) -> FullDisk:
    """A fit whose third stage-1 backup (the end of epoch 3) hits a full disk."""
    disk = FullDisk(monkeypatch, "save_weights",
                    lambda p: p.parent.name == "stage1" and p.name.endswith("latest.weights.h5"),
                    nth=3, run_dir=run_dir)
    line = one_error_line(run("fit", data, "--run-dir", run_dir, *FLAGS))
    assert disk.fired
    target = run_dir / "resume" / "stage1" / "latest.weights.h5"
    assert line.startswith(f"error: no space left on device while writing '{target}' (")
    assert "its previous version is kept unchanged" in line
    assert line.endswith(f"then resume with: jewelclf fit --resume --run-dir {run_dir}")
    monkeypatch.undo()
    return disk


def test_disk_full_in_an_epoch_backup_keeps_the_previous_backup_and_resumes(data, tmp_path, monkeypatch):
    """Keras' BackupAndRestore rewrites ``latest.weights.h5`` in place; jewelclf's replaces it."""
    run_dir = tmp_path / "run"
    disk = _stop_in_an_epoch_backup(data, run_dir, monkeypatch)
    backup = run_dir / "resume" / "stage1"
    assert {"resume/stage1/latest.weights.h5", "resume/stage1/latest.weights.h5.bkp",
            "resume/stage1/training_metadata.json", "resume/stage1/training_metadata.json.bkp"} <= set(disk.before)
    assert digests(run_dir) == disk.before and leftovers(run_dir) == []
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert_resumes(run_dir, "stage 1: resuming after epoch 2")


def test_a_corrupt_latest_backup_falls_back_to_the_bkp_copy(data, tmp_path, monkeypatch):
    """``double_checkpoint``: when ``latest.weights.h5`` cannot be opened (here: truncated by
    hand after the full disk), Keras restores the ``.bkp`` pair, and the history is trimmed to
    that pair's epoch, so the epochs still number without a repeat."""
    run_dir = tmp_path / "run"
    _stop_in_an_epoch_backup(data, run_dir, monkeypatch)
    latest = run_dir / "resume" / "stage1" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:1000])
    assert progress_mod.Progress(run_dir).backed_up_epochs("stage1") == 1  # the .bkp pair's epoch
    assert_resumes(run_dir, "stage 1: resuming after epoch 1")


@pytest.mark.parametrize("name, nth", [("stage1_best.weights.h5", 2), ("best.weights.h5", 2)],
                         ids=["stage1-best", "stage2-best"])
def test_disk_full_saving_a_new_best_keeps_the_previous_best(data, tmp_path, monkeypatch, name, nth):
    """A new best (ModelCheckpoint) after a first one: the first stays, byte for byte.
    ``best.weights.h5``'s first save is stage 2's start (atomic); its second, the first
    improvement in stage 2, is ModelCheckpoint's."""
    run_dir = tmp_path / "run"
    disk = FullDisk(monkeypatch, "save_weights", lambda p: p.name in (name, f".tmp-{name}"), nth=nth,
                    run_dir=run_dir)
    line = one_error_line(run("fit", data, "--run-dir", run_dir, *FLAGS, "--fine-tune-epochs", "4"))
    assert disk.fired
    assert f"'{run_dir / 'checkpoints' / name}'" in line and "kept unchanged" in line
    assert digests(run_dir) == disk.before and leftovers(run_dir) == []
    monkeypatch.undo()
    assert_resumes(run_dir)


def test_disk_full_saving_model_keras_leaves_no_partial_model_and_resumes(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    disk = FullDisk(monkeypatch, "save", lambda p: p.name.endswith("model.keras"), run_dir=run_dir)
    line = one_error_line(run("fit", data, "--run-dir", run_dir, *FLAGS))
    assert disk.fired and disk.path.name == ".tmp-model.keras"  # written beside, not in place
    assert line.startswith(f"error: no space left on device while writing '{run_dir / 'model.keras'}' (")
    assert "nothing was written there" in line
    assert line.endswith(f"then resume with: jewelclf fit --resume --run-dir {run_dir}")
    assert not (run_dir / "model.keras").exists() and leftovers(run_dir) == []
    assert digests(run_dir) == disk.before  # every phase's end and checkpoint kept for the resume
    assert json.loads((run_dir / "run_info.json").read_text())["status"] == "running"
    output = assert_resumes(run_dir, "resuming: stage2.1 had finished")
    assert "stage 2 step 1: unfrozen" not in output  # nothing is trained again


def test_disk_full_anywhere_else_in_fit_is_one_line(data, tmp_path, monkeypatch):
    """ENOSPC half-way through the third row appended to ``history.csv``."""
    from jewelclf.training import callbacks as training

    run_dir = tmp_path / "run"
    calls = []

    class HalfThenFull:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if str(file).endswith("history.csv") and "a" in mode:
            calls.append(file)
            if len(calls) == 3:
                return HalfThenFull(f)
        return f

    monkeypatch.setattr(training, "open", fake_open, raising=False)
    line = one_error_line(run("fit", data, "--run-dir", run_dir, *FLAGS))
    assert len(calls) == 3
    assert line.startswith("error: no space left on device") and "free disk space" in line
    assert line.endswith(f"then resume with: jewelclf fit --resume --run-dir {run_dir}")
    monkeypatch.undo()
    assert_resumes(run_dir)  # the half row is trimmed away with the epoch it belonged to


# --------------------------------------------------------------------------------------------
# The Keras callbacks on their own


def _tiny_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.05), "categorical_crossentropy")
    return model


def _xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)]
    return x, y


class AlwaysImproves(keras.callbacks.Callback):
    """Makes every epoch's val_loss a new best, so each epoch saves a checkpoint."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = 10.0 - epoch


@pytest.mark.parametrize("atomic", [False, True], ids=["keras", "jewelclf"])
def test_model_checkpoint_on_a_full_disk(tmp_path, monkeypatch, atomic):
    """Keras' ModelCheckpoint loses the previous best (the new one is written over it); jewelclf's
    AtomicModelCheckpoint keeps it byte for byte and says so in one line."""
    path = tmp_path / "best.weights.h5"
    cls = progress_mod.AtomicModelCheckpoint if atomic else keras.callbacks.ModelCheckpoint
    model, (x, y) = _tiny_model(), _xy()
    checkpoint = cls(str(path), monitor="val_loss", save_best_only=True, save_weights_only=True)
    model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0, callbacks=[AlwaysImproves(), checkpoint])
    first = path.read_bytes()
    FullDisk(monkeypatch, "save_weights", lambda p: p.name.endswith("best.weights.h5"))
    with pytest.raises(fsio.DiskFullError if atomic else OSError) as e:
        model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0,
                  callbacks=[AlwaysImproves(), checkpoint])
    if atomic:
        assert path.read_bytes() == first and leftovers(tmp_path) == []
        assert str(e.value).startswith(f"no space left on device while writing '{path}' (")
        assert "kept unchanged" in str(e.value) and "\n" not in str(e.value)
    else:
        assert len(path.read_bytes()) < len(first)  # the previous best is gone
        with pytest.raises(OSError):
            model.load_weights(path)


@pytest.mark.parametrize("cls", [keras.callbacks.BackupAndRestore, progress_mod.AtomicBackupAndRestore],
                         ids=["keras", "jewelclf"])
def test_backup_and_restore_falls_back_to_the_bkp_pair(tmp_path, cls):
    """``double_checkpoint=True`` keeps the previous epoch as ``*.bkp``; a ``latest.weights.h5``
    that cannot be opened (truncated) is replaced by it at restore, so training resumes one
    epoch earlier, from that epoch's weights."""
    backup = tmp_path / "backup"
    model, (x, y) = _tiny_model(), _xy()
    saved = {}

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved[epoch + 1] = [w.copy() for w in self.model.get_weights()]

    model.fit(x, y, epochs=3, verbose=0,
              callbacks=[Keep(), cls(str(backup), double_checkpoint=True, delete_checkpoint=False)])
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 3
    assert json.loads((backup / "training_metadata.json.bkp").read_text())["epoch"] == 2
    latest = backup / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    restored = {}

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after BackupAndRestore's (it comes first)
            restored["weights"] = [w.copy() for w in self.model.get_weights()]

    fresh = _tiny_model()
    history = fresh.fit(x, y, epochs=5, verbose=0,
                        callbacks=[cls(str(backup), double_checkpoint=True, delete_checkpoint=False), Look()])
    assert len(history.history["loss"]) == 3  # epochs 3, 4, 5: resumed after epoch 2
    for got, want in zip(restored["weights"], saved[2]):
        np.testing.assert_array_equal(got, want)


def test_atomic_backup_and_restore_keeps_the_previous_pair_on_a_full_disk(tmp_path, monkeypatch):
    backup = tmp_path / "backup"
    model, (x, y) = _tiny_model(), _xy()
    callback = progress_mod.AtomicBackupAndRestore(str(backup), double_checkpoint=True,
                                                   delete_checkpoint=False)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    before = digests(tmp_path, ("backup",))
    assert len(before) == 4  # latest + .bkp, weights and metadata
    FullDisk(monkeypatch, "save_weights", lambda p: p.name.endswith("latest.weights.h5"))
    with pytest.raises(fsio.DiskFullError, match="kept unchanged"):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[callback])
    assert digests(tmp_path, ("backup",)) == before and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The writers


def test_atomic_writers_on_a_full_disk_keep_the_previous_file(tmp_path, monkeypatch):
    text_file, saved_file = tmp_path / "state.json", tmp_path / "features.npz"
    fsio.atomic_write_text(text_file, "previous\n")
    fsio.atomic_save(saved_file, lambda p: np.savez(p, a=np.arange(3)))
    text_before, saved_before = text_file.read_bytes(), saved_file.read_bytes()

    def fsync_fails(fd):  # as NFS, or ext4 past its reservation, report it: at the flush
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(rd.os, "fsync", fsync_fails)
        with pytest.raises(fsio.DiskFullError) as e:
            fsio.atomic_write_text(text_file, "new " * 10_000)
    assert text_file.read_bytes() == text_before
    message = str(e.value)
    assert message.startswith(f"no space left on device while writing '{text_file}' (")
    assert "free on that disk); its previous version is kept unchanged; free disk space, then run " \
           "the command again" in message

    def half_then_full(tmp):
        Path(tmp).write_bytes(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(fsio.DiskFullError, match="kept unchanged"):
        fsio.atomic_save(saved_file, half_then_full)
    assert saved_file.read_bytes() == saved_before

    def tf_full(tmp):  # TensorFlow's file ops: ResourceExhaustedError, no errno
        Path(tmp).mkdir()
        (Path(tmp) / "part").write_bytes(b"x")
        raise tf.errors.ResourceExhaustedError(None, None, f"{tmp}/part-00000; No space left on device [Op:SaveV2]")

    with pytest.raises(fsio.DiskFullError, match="nothing was written there"):
        fsio.atomic_save(tmp_path / "new.tflite", tf_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npz", "state.json"]

    def raises(exc):
        def save(tmp):
            raise exc
        return save

    with pytest.raises(fsio.DiskFullError, match="^disk quota exceeded while writing"):
        fsio.atomic_save(tmp_path / "q.bin", raises(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
    with pytest.raises(PermissionError):  # other errors pass through unchanged
        fsio.atomic_save(tmp_path / "p.bin", raises(PermissionError(errno.EACCES, "denied")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npz", "state.json"]


def test_a_save_the_disk_has_no_room_for_is_refused_before_it_starts(tmp_path, monkeypatch):
    """HDF5 does not recover from a full disk met part-way (the half-written file stays open in
    the library, which crashes the process at exit), so a checkpoint the disk visibly cannot
    hold is refused before h5py opens anything: a re-save needs the old file's size, a first
    save :func:`jewelclf.training.checkpoints.weights_bytes` of the model."""
    model, (x, y) = _tiny_model(), _xy()
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "best.weights.h5"
    model.save_weights(path)
    before = path.read_bytes()
    estimate = progress_mod.weights_bytes(model)
    assert len(before) <= estimate <= 2 * len(before) + 64 * 1024
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(rd.shutil, "disk_usage", lambda p: usage._replace(free=len(before) // 2))

    def never(tmp):
        raise AssertionError("the save started")

    with pytest.raises(fsio.DiskFullError) as e:
        fsio.atomic_save(path, never)
    assert str(e.value).startswith(f"no space left on device for '{path}': it needs about ")
    assert "its previous version is kept unchanged; free disk space" in str(e.value)
    with pytest.raises(fsio.DiskFullError, match="nothing was written there"):
        fsio.atomic_save(tmp_path / "new.weights.h5", never, progress_mod.weights_bytes(model))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --------------------------------------------------------------------------------------------
# export: a full disk while TF Serving polls the model's folder


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("where", ["variables", "assets"])
def test_disk_full_during_a_savedmodel_export_keeps_the_previous_version(tiny_run, tmp_path, monkeypatch,
                                                                         where):
    """``variables``: TensorFlow's SaveV2 runs out of space (the real error type and message);
    ``assets``: the real SavedModel is written, then ``assets.extra/jewelclf.json`` half-written.
    Version 1 stays byte for byte, no version 2 and no temp folder are left in the folder TF
    Serving polls, and the user gets one line."""
    base = tmp_path / "models" / "tiny"
    (base / "1" / "variables").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"version 1's graph")
    (base / "1" / "variables" / "variables.index").write_bytes(b"version 1's variables")
    (base / layout.MODELS_CONFIG).write_text("model_config_list {}\n")
    before, names = tree_digest(base), sorted(p.name for p in base.iterdir())

    if where == "variables":
        def write(run, path, policy):
            (Path(path) / "variables").mkdir(parents=True)
            (Path(path) / "saved_model.pb").write_bytes(b"\x08\x01 new graph")
            (Path(path) / "variables" / "variables.data-00000-of-00001").write_bytes(b"\x00" * 4096)
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{{{{function_node __wrapped__SaveV2}}}} {path}/variables/variables_temp/"
                            f"part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device "
                            f"[Op:SaveV2]")

        monkeypatch.setattr(ex, "write_savedmodel", write)
    else:
        real_write_text = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name == layout.INFO and self.parent.name == "assets.extra":
                real_write_text(self, text[: len(text) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_text(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)

    line = one_error_line(run("export", tiny_run, "--output", base))
    assert line.startswith(f"error: no space left on device while writing SavedModel version 2 into "
                           f"'{base}' (")
    assert "the half-written copy was removed and version 1 is unchanged" in line
    assert line.endswith("free disk space, then run the command again")
    assert tree_digest(base) == before
    assert sorted(p.name for p in base.iterdir()) == names  # no 2/, no .tmp-export-*
    assert layout.list_versions(base) == [1]
