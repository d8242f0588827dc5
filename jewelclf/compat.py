"""Every workaround that reaches into a private API of Keras, TensorFlow, keras-tuner or h5py.

Each entry names the versions it was written for and what to check when they change; the
rest of jewelclf calls these functions and touches no private attribute itself. Imports of
the libraries stay inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# --- training: resume state and checkpoints (jewelclf.training.checkpoints) ------------------


def seed_variables(model) -> list:
    """The state variables of ``model``'s seed generators (each once, in a fixed order)."""
    # Keras 3.15 names each SeedGenerator's state variable "seed_generator_state"; Layer.variables
    # holds them (Layer.weights, and so save_weights, do not). Check the name when Keras changes.
    seen, out = set(), []
    for v in model.variables:
        if v.path.endswith("seed_generator_state") and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def forget_restored_epoch(model) -> None:
    """Clear the epoch a ``BackupAndRestore`` restored into ``model``.

    Keras 3.15's ``BackupAndRestore`` tells ``fit`` where to start by setting the private
    ``model._initial_epoch``, which ``fit`` prefers to its own ``initial_epoch`` and nobody
    resets: the next ``fit`` of the same model (the next unfreezing step, whose backup is
    empty) would start at that epoch too and train fewer epochs than asked. For Keras 3.15: check
    that ``fit`` still reads ``_initial_epoch`` when Keras changes.
    """
    if getattr(model, "_initial_epoch", None) is not None:
        model._initial_epoch = None


# --- training: distribution and precision (jewelclf.training.runtime) -------------------------


def lenient_heartbeats(seconds: int) -> None:
    """Let a worker miss TensorFlow's heartbeats for ``seconds`` before the cluster gives up.

    The strategy sets up TensorFlow's coordination service with a 10 s heartbeat timeout,
    after which the whole run fails ("tasks are unhealthy (stopped sending heartbeats)"); a
    worker on a busy machine (other jobs, a data check using every core) can be starved that
    long. A worker that exits is still noticed at once (its connection closes). Set up here,
    before the strategy, in its place; on a TensorFlow without these internals, TF's default
    stays. Written for TensorFlow 2.21 (``tensorflow.python`` and the XLA TSL protobuf are
    private: check both import paths and ``configure_coordination_service`` when it changes).
    """
    try:
        import tensorflow as tf
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.distribute import multi_worker_util
        from tensorflow.python.eager import context

        if context.context().coordination_service is not None:
            return
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        spec = multi_worker_util.normalize_cluster_spec(resolver.cluster_spec())
        jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
                for job in ("chief", "worker") if job in spec.jobs]
        context.context().configure_coordination_service(
            service_type="standalone", service_leader=multi_worker_util.coordination_leader(spec),
            coordinated_jobs=jobs, heartbeat_timeout_in_ms=seconds * 1000)
    except Exception:  # noqa: BLE001 - best effort: TensorFlow's own defaults otherwise
        return


# --- training: TensorBoard (jewelclf.training.tensorboard) ------------------------------------


def set_tensorboard_summary(callback, module) -> None:
    """Make a Keras ``TensorBoard`` callback write through ``module`` in place of ``tf.summary``.

    For Keras 3.15, whose callback reads its summary module from the private
    ``_summary_module`` (``TensorBoard.summary``); check that name when Keras changes.
    """
    callback._summary_module = module


def pop_tensorboard_writer(callback) -> None:
    """Leave the writer a Keras 3.15 ``TensorBoard`` pushed for evaluation (private ``_pop_writer``)."""
    callback._pop_writer()


def flush_tensorboard_writers(callback) -> None:
    """Flush every open writer of a Keras 3.15 ``TensorBoard`` callback (private ``_writers``)."""
    for writer in callback._writers.values():
        writer.flush()


# --- tuning: keras-tuner trials (jewelclf.tuning) --------------------------------------------


def gradient_registry() -> dict | None:
    """TensorFlow's global registry of gradient functions (private API; ``None`` if it moved).

    For TensorFlow 2.21 (``tensorflow.python.framework.ops._gradient_registry._registry``); the
    trial hooks drop the ``CustomGradient-*`` entries a finished trial left (tensorflow#97697).
    """
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
    except (ImportError, AttributeError):
        return None
    return registry if isinstance(registry, dict) else None


def hyperband_checkpoint(tuner, trial_id: str) -> str:
    """The weights file a Hyperband trial saves and its continuation trials load.

    For keras-tuner 1.4 (``Tuner._get_checkpoint_fname``, private).
    """
    return tuner._get_checkpoint_fname(trial_id)


class TensorBoardImportGuard:
    """Mixin for a keras-tuner tuner: skips ``Tuner._configure_tensorboard_dir`` (private) when no
    TensorBoard callback is given.

    For keras-tuner 1.4, which imports tensorboard there even when no TensorBoard callback is
    used, and TensorFlow 2.21, which no longer installs tensorboard. jewelclf passes keras-tuner
    no such callback: train_model writes each trial's logs itself, into its work folder
    (search/trial_<id>/tensorboard/stage1 and stage2, see jewelclf.training.tensorboard).
    """

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        if any(type(cb).__name__ == "TensorBoard" for cb in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)


# --- files: h5py's reports of a full disk (jewelclf.fsio) -------------------------------------
# For h5py 3.x on HDF5 1.14.6 (checked with h5py 3.14.0 / HDF5 1.14.6): h5py reports a failed write
# again from its objects' destructors. When they change, check that a full disk during a
# ``.weights.h5`` save still prints one line (tests/e2e/test_disk_full.py).

_h5py_reports_quiet = False


def _from_h5py(exc: BaseException | None, where: Any = None) -> bool:
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if "h5py" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return "h5py" in repr(where)


def quiet_h5py_disk_full_reports(is_disk_full: Callable[[BaseException | None], bool]) -> None:
    """Drop the reports h5py prints of a full disk it already raised, for the rest of the process.

    h5py reports a failed write twice: once as the exception, then again from the destructor of
    each object of the file ("Traceback ... RuntimeError: Can't decrement id ref count (file
    write failed ... No space left on device)", through ``sys.excepthook`` and
    ``sys.unraisablehook``), at once or when the interpreter exits. Only those reports (a full
    disk as ``is_disk_full`` tells, from h5py's own code) are dropped; every other error is shown
    as before.
    """
    global _h5py_reports_quiet
    if _h5py_reports_quiet:
        return
    _h5py_reports_quiet = True
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable(report):
        if not (is_disk_full(report.exc_value) and _from_h5py(report.exc_value, report.object)):
            previous_unraisable(report)

    def excepthook(kind, value, tb):
        if not (is_disk_full(value) and _from_h5py(value)):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
