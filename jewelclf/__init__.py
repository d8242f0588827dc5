"""jewelclf: turn a folder of product photos into a production image classifier."""

__version__ = "0.1.0"
