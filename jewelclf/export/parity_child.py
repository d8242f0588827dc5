"""The parity check's child: run an exported SavedModel's signatures in a process without jewelclf.

:func:`jewelclf.export.parity.run_in_fresh_process` runs this file by its path (never with
``-m``), so the child imports only the standard library, NumPy and TensorFlow, as a TF Serving
host would; it reports whether jewelclf got imported anyway. The request (the SavedModel and an
``.npz`` of inputs) comes as JSON on stdin; the answer is one ``PARITY-JSON {...}`` line.

The child must not outlive the export (a kill -9 of it included), so it watches its parent from
its first line: in the child itself, not as a ``preexec_fn``, which is unsafe in a process with
TensorFlow's threads. The export names its pid in ``JEWELCLF_EXPORT_PID``
(:data:`jewelclf.export.staging.PARENT_ENV`).
"""

import ctypes
import json
import os
import signal
import sys
import threading
import time

PARENT_ENV = "JEWELCLF_EXPORT_PID"  # = jewelclf.export.staging.PARENT_ENV; this file cannot import it


def watch_parent() -> None:
    """Die with the export: PR_SET_PDEATHSIG on Linux, and a watcher thread elsewhere."""
    parent = int(os.environ.get(PARENT_ENV, os.getppid()))
    if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG: SIGKILL when the export dies
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)

    def watch():  # where there is no PR_SET_PDEATHSIG
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def drop_own_folder() -> None:
    """Take this file's folder (jewelclf's export package) off ``sys.path``: nothing of it may
    shadow a module TensorFlow imports."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


def spec(t) -> dict:
    """A tensor spec as JSON: dtype name and shape (``None`` for an unknown rank)."""
    return {"dtype": t.dtype.name, "shape": t.shape.as_list() if t.shape.rank is not None else None}


def plain(outputs) -> dict:
    """A signature's outputs as JSON lists, strings decoded."""
    import numpy as np

    out = {}
    for key, value in outputs.items():
        v = value.numpy()
        if v.dtype == object:
            v = np.vectorize(lambda s: s.decode("utf-8"), otypes=[object])(v) if v.size else v
        out[key] = v.tolist()
    return out


def run(req: dict) -> dict:
    """The signatures of ``req["saved_model"]`` and their outputs on ``req["arrays"]``."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(req["saved_model"])
    signatures = {}
    for name, fn in loaded.signatures.items():
        signatures[name] = {
            "inputs": {k: spec(v) for k, v in fn.structured_input_signature[1].items()},
            "outputs": {k: spec(v) for k, v in fn.structured_outputs.items()},
        }
    arrays = np.load(req["arrays"])
    n = int(arrays["n"])
    encoded = [arrays[f"encoded_{i}"].tobytes() for i in range(n)]
    result = {"signatures": signatures}
    result["serving_default"] = plain(loaded.signatures["serving_default"](images=tf.constant(encoded)))
    pixels = loaded.signatures["serving_pixels"]
    result["serving_pixels"] = [plain(pixels(pixels=tf.constant(arrays[f"pixels_{i}"][None])))
                                for i in range(n)]
    if "embed" in loaded.signatures:
        result["embed"] = plain(loaded.signatures["embed"](images=tf.constant(encoded)))
    return result


def main() -> None:
    """Read the request on stdin, print the ``PARITY-JSON`` line."""
    watch_parent()
    drop_own_folder()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = run(json.load(sys.stdin))
    result["jewelclf_imported"] = any(m == "jewelclf" or m.startswith("jewelclf.") for m in sys.modules)
    print("PARITY-JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
