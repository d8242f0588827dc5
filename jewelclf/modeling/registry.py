"""The custom Keras objects of jewelclf's models, for loading a saved ``.keras`` file.

:func:`custom_objects` names every class that a model saved by ``jewelclf fit`` can hold, so a
loader passes them explicitly (``custom_objects=``) rather than relying on an import having
registered them.
"""

from __future__ import annotations

from jewelclf.modeling.augmentation import Augmentation
from jewelclf.modeling.embedding import L2Normalize
from jewelclf.modeling.preprocessing import BackbonePreprocessing


def custom_objects() -> dict[str, type]:
    """The custom layers of jewelclf's models by their registered names, for ``load_model``."""
    return {
        "jewelclf>Augmentation": Augmentation,
        "jewelclf>BackbonePreprocessing": BackbonePreprocessing,
        "jewelclf>L2Normalize": L2Normalize,
    }
