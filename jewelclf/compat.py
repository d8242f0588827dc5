"""Every workaround that reaches into a private API of Keras, TensorFlow, keras-tuner or h5py.

Each entry names the versions it was written for and what to check when they change; the
rest of jewelclf calls these functions and touches no private attribute itself. Imports of
the libraries stay inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

# --- training: resume state and checkpoints (jewelclf.training.checkpoints) ------------------

# --- training: distribution and precision (jewelclf.training.runtime) -------------------------

# --- training: TensorBoard (jewelclf.training.tensorboard) ------------------------------------

# --- tuning: keras-tuner trials (jewelclf.tuning) --------------------------------------------

# --- files: h5py's reports of a full disk (jewelclf.fsio) -------------------------------------
