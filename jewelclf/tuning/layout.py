"""The names of what ``jewelclf tune`` writes into its run folder: keras-tuner's search state,
the space file, and the results (``trials.csv``, ``best_config.yaml``, the report and the plot).
"""

SEARCH_DIR = "search"
SPACE_FILE = "space.yaml"
TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
REPORT = "tuning_report.md"
PLOT = "tuning_scores.png"
