"""Data: finding examples, checking files, splitting, and the tf.data pipeline."""
