"""Where and in what numerics training runs: ``train.precision`` and ``train.distribute``.

``train.precision`` sets Keras' dtype policy while the model is built and trained (the softmax
stays float32); ``train.distribute`` builds and compiles the model inside a ``tf.distribute``
strategy's scope, with ``data.batch_size`` per replica (see :class:`Distribution`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import keras
import tensorflow as tf

from jewelclf import compat
from jewelclf.config import Config
from jewelclf.errors import JewelclfError

Log = Callable[[str], None]


def model_scope(model: keras.Model):
    """The scope of the tf.distribute strategy ``model`` was built under (the default one if none)."""
    return model.distribute_strategy.scope()


def resolve_precision(precision: str) -> str:
    """``auto``: mixed_float16 when TensorFlow sees a GPU, float32 on a CPU (where float16
    math is emulated and slower); any other value is returned as is."""
    if precision != "auto":
        return precision
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"


def describe_precision(config: Config, resolved: str) -> str:
    """The log line of a run's or search's numerics: the resolved precision and jit_compile."""
    auto = " (auto)" if config.train.precision == "auto" else ""
    return f"precision {resolved}{auto}, jit_compile {config.train.jit_compile}"


@contextlib.contextmanager
def precision_policy(precision: str):
    """Set Keras' global dtype policy to ``precision`` (resolved) for the block; restore it after.

    Models built inside the block take the policy: under ``mixed_*`` layers compute in
    float16/bfloat16 with float32 weights, and the softmax stays float32
    (:func:`jewelclf.modeling.classifier.build_head`). ``compile`` wraps the optimizer in a
    ``LossScaleOptimizer`` under ``mixed_float16``.
    """
    resolved = resolve_precision(precision)
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(resolved)
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's TF trainer passes.

    Keras 3.15's TensorFlow trainer calls ``strategy.reduce`` in two ways that TensorFlow's
    multi-worker strategy rejects, so a plain ``fit`` fails before its first step
    (keras-team/keras#20585, tensorflow/tensorflow#72388):

    - ``_maybe_symbolic_build`` reduces the first ``(x, y)`` batch, a tuple of ``PerReplica``
      values, only to learn its shapes: the collective all-reduce takes one value at a time
      ("Attempt to convert a value (PerReplica...) with an unsupported type to a Tensor"), and
      the shards of an uneven batch differ in size between workers ("Shape mismatch in the
      collective instance");
    - ``reduce_per_replica`` averages the replicas' metric values, scalars, over ``axis=0``
      ("Invalid reduction dimension 0 for input with 0 dimensions").

    Here a scalar is averaged over the replicas (``axis=None``), and a batch reduced with
    ``axis=None`` is this worker's own shard (the shapes are all Keras needs from it). Those
    are the only two calls Keras makes; everything else is TensorFlow's strategy, unchanged.
    """

    def reduce(self, reduce_op, value, axis=None):
        parent = super()

        def one(v):
            local = self.experimental_local_results(v)
            if all(getattr(c, "shape", None) is not None and c.shape.rank == 0 for c in local):
                return parent.reduce(reduce_op, v, None)
            if axis is None:
                return local[0]
            return parent.reduce(reduce_op, v, axis)

        return tf.nest.map_structure(one, value)


@dataclass
class Distribution:
    """The tf.distribute strategy of a run (``None`` for ``train.distribute: none``)."""

    mode: str = "none"
    strategy: tf.distribute.Strategy | None = None
    workers: int = 1
    task_index: int = 0
    chief: bool = True
    """Whether this process writes the run dir (the only process, or the chief worker)."""

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "replicas": self.replicas, "workers": self.workers}


_TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}\' (index 1 on host2)')


def _tf_config() -> tuple[int, int, bool]:
    """(workers, this task's index among them, chief?) from ``TF_CONFIG``; one-line errors."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    fix = f"set it on every machine, e.g. {_TF_CONFIG_EXAMPLE}"
    if not raw:
        raise JewelclfError(f"--distribute multi_worker needs the TF_CONFIG environment variable "
                            f"naming the cluster and this worker; {fix}")
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise JewelclfError(f"TF_CONFIG is not valid JSON ({e}); {fix}") from None
    cluster = conf.get("cluster") if isinstance(conf, dict) else None
    task = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise JewelclfError(f"TF_CONFIG needs a 'cluster' and a 'task' mapping; {fix}")
    kinds = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    bad = [k for k, v in kinds.items()
           if not isinstance(v, list) or not v or not all(isinstance(a, str) and ":" in a for a in v)]
    if not kinds or bad:
        raise JewelclfError(f"TF_CONFIG's cluster must list 'worker' addresses as \"host:port\" "
                            f"strings (and at most one 'chief'); {fix}")
    if len(kinds.get("chief", [])) > 1:
        raise JewelclfError(f"TF_CONFIG's cluster lists {len(kinds['chief'])} chiefs; list one "
                            f"'chief' at most (or none: worker 0 is then the chief)")
    kind, index = task.get("type"), task.get("index")
    if kind not in kinds or not isinstance(index, int) or isinstance(index, bool) \
            or not 0 <= index < len(kinds[kind]):
        raise JewelclfError(f"TF_CONFIG's task {task!r} is not one of its cluster's "
                            f"{'/'.join(kinds)} entries; give each machine its own "
                            f"{{\"type\": \"worker\", \"index\": i}} with i from 0 to "
                            f"{len(kinds.get('worker', [])) - 1}")
    order = ["chief"] * len(kinds.get("chief", [])) + ["worker"] * len(kinds.get("worker", []))
    position = index + (len(kinds.get("chief", [])) if kind == "worker" else 0)
    chief = kind == "chief" or ("chief" not in kinds and index == 0)
    return len(order), position, chief


HEARTBEAT_TIMEOUT_SECONDS = 60


def make_distribution(mode: str, log: Log = print) -> Distribution:
    """The strategy of ``train.distribute``; create it before TensorFlow runs anything else.

    ``mirrored``: ``tf.distribute.MirroredStrategy`` over all local GPUs (one replica on the
    CPU when there is none). ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the machines
    of ``TF_CONFIG``; the chief (``task`` ``chief``, or worker 0 when the cluster has no chief)
    writes the run dir, the other workers write only to a temporary folder.
    """
    if mode == "none":
        return Distribution()
    if mode == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        devices = list(strategy.extended.worker_devices)
        note = "" if tf.config.list_physical_devices("GPU") else " (no GPU visible: one replica on the CPU)"
        log(f"distribute mirrored: {strategy.num_replicas_in_sync} replica(s) on "
            f"{', '.join(devices)}{note}")
        return Distribution("mirrored", strategy)
    workers, index, chief = _tf_config()
    compat.lenient_heartbeats(HEARTBEAT_TIMEOUT_SECONDS)
    try:
        strategy = _MultiWorkerStrategy()
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise JewelclfError(f"could not start the multi-worker strategy ({first}); it must be "
                            f"created before TensorFlow runs anything else in the process: run "
                            f"jewelclf fit in a fresh process on every worker") from None
    log(f"distribute multi_worker: worker {index} of {workers}"
        f"{' (chief: writes the run dir)' if chief else ''}, "
        f"{strategy.num_replicas_in_sync} replica(s) in all")
    return Distribution("multi_worker", strategy, workers, index, chief)


