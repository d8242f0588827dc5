"""What ``jewelclf tune`` leaves behind: ``trials.csv``, ``best_config.yaml``, the top-trials table
(terminal and ``tuning_report.md``) and a plot of the score against each hyperparameter.

Everything is read back from the keras-tuner oracle, so a resumed or distributed search reports
all of its trials, wherever they ran.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable

from jewelclf import fsio
from jewelclf.config import Config
from jewelclf.errors import JewelclfError
from jewelclf.tuning.layout import BEST_CONFIG, PLOT, REPORT, SEARCH_DIR, TRIALS_CSV
from jewelclf.tuning.space import HYPERPARAMETERS, Space, config_for

METRICS = ("val_accuracy", "val_macro_f1", "val_loss", "seconds", "rss_mb", "peak_rss_mb")
BUDGET = {"epochs_from": "tuner/initial_epoch", "epochs_to": "tuner/epochs",
          "continues_trial": "tuner/trial_id"}
"""Hyperband's budget of a trial, as positions in the two-stage schedule."""
TOP = 10


def _fmt(name: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if name == "seconds":
            return f"{v:.1f}"
        if "learning_rate" in name:
            return f"{v:.2e}"
        if name in ("score", "val_accuracy", "val_macro_f1", "val_loss"):
            return f"{v:.4f}"
        return f"{v:.3g}"
    return str(v)


class Outputs:
    """Writes a search's results into its run dir."""

    def __init__(self, run_dir: Path, config: Config, space: Space, objective: str,
                 class_names: list[str]):
        self.run_dir, self.config, self.space = Path(run_dir), config, space
        self.objective, self.class_names = objective, class_names
        self.names = [n for n in HYPERPARAMETERS if n in space]

    def rows(self, oracle) -> list[dict[str, Any]]:
        """One row per trial, in the order the trials started."""
        order = list(oracle.start_order) + [t for t in oracle.trials if t not in oracle.start_order]
        hyperband = any("tuner/epochs" in t.hyperparameters.values for t in oracle.trials.values())
        rows = []
        for number, trial_id in enumerate(order, start=1):
            t = oracle.trials[trial_id]
            values = t.hyperparameters.values
            # number: keras-tuner's "Trial #N" (from 1, in start order); trial: its id, the
            # folder search/trial_<id>
            row: dict[str, Any] = {"number": number, "trial": trial_id, "status": t.status,
                                   "score": t.score if t.status == "COMPLETED" else None}
            row.update({m: t.metrics.get_last_value(m) if t.metrics.exists(m) else None for m in METRICS})
            row["execution_scores"] = self.execution_scores(trial_id)
            row.update({n: values.get(n) for n in self.names})
            if hyperband:
                row.update({col: values.get(key) for col, key in BUDGET.items()})
            row["error"] = (t.message or "").strip().splitlines()[-1][:300] if t.message else ""
            rows.append(row)
        return rows

    def execution_scores(self, trial_id: str) -> str:
        """The objective of each execution of a trial run more than once, space-separated in
        execution order (the trial's ``score`` is their mean, as keras-tuner averages them);
        empty for a trial of one execution."""
        import json

        trial_dir = self.run_dir / SEARCH_DIR / f"trial_{trial_id}"
        scores = []
        for path in sorted(trial_dir.glob("execution_*/trial_summary.json"),
                           key=lambda p: int(p.parent.name.split("_")[1])):
            try:
                scores.append(f"{float(json.loads(path.read_text())[self.objective]):.6f}")
            except (OSError, ValueError, KeyError, TypeError):
                scores.append("?")  # an execution cut off while writing its summary
        return " ".join(scores)

    def write_trials(self, oracle) -> list[dict[str, Any]]:
        rows = self.rows(oracle)
        if rows:
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
            fsio.atomic_write_text(self.run_dir / TRIALS_CSV, out.getvalue())
        return rows

    def best_config(self, row: dict[str, Any]) -> Config:
        return config_for(self.config, {n: row[n] for n in self.names})

    def table(self, rows: list[dict[str, Any]], markdown: bool) -> str:
        """The top trials by score, best first."""
        done = sorted((r for r in rows if r["status"] == "COMPLETED"), key=lambda r: -r["score"])[:TOP]
        other = "val_macro_f1" if self.objective == "val_accuracy" else "val_accuracy"
        cols = ["number", "trial", "score", other, *self.names]
        if done and "epochs_to" in done[0]:
            cols.append("epochs_to")
        cols.append("seconds")
        names = {"score": self.objective, "number": "trial #", "trial": "id"}
        header = ["rank", *[names.get(c, c) for c in cols]]
        body = [[str(i), *[_fmt(c, r[c]) for c in cols]] for i, r in enumerate(done, start=1)]
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(b) + " |" for b in body]
            return "\n".join(lines)
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [header, *body])

    def plot(self, rows: list[dict[str, Any]]) -> None:
        """The score of each completed trial against each tuned hyperparameter."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tuned = [n for n in self.names if "fixed" not in self.space[n]]
        done = [r for r in rows if r["status"] == "COMPLETED"]
        if not tuned or not done:
            return
        best = max(done, key=lambda r: r["score"])
        cols = min(3, len(tuned))
        nrows = math.ceil(len(tuned) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, tuned):
            points = [(r[name], r["score"]) for r in done if r[name] is not None]
            if points:
                ax.scatter(*zip(*points), alpha=0.7)
            if best[name] is not None:
                ax.scatter([best[name]], [best["score"]], color="red", zorder=3, label="best")
                ax.legend(fontsize=8)
            if self.space[name].get("sampling") == "log":
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(self.objective)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tuned):]:
            ax.axis("off")
        fig.suptitle(f"{self.objective} of {len(done)} trials against each hyperparameter")
        fig.tight_layout()
        fsio.atomic_save(self.run_dir / PLOT, lambda p: fig.savefig(p, dpi=100))
        plt.close(fig)

    def write_all(self, oracle, settings, search_seconds: float, fast_seconds: float | None,
                  log: Callable[[str], None]) -> dict[str, Any]:
        """trials.csv, best_config.yaml, the plot and tuning_report.md; print the table."""
        rows = self.write_trials(oracle)
        done = [r for r in rows if r["status"] == "COMPLETED"]
        if not done:
            raise JewelclfError(f"no trial of the search in '{self.run_dir}' finished; see the error "
                                f"column of {self.run_dir / TRIALS_CSV}")
        best = max(done, key=lambda r: r["score"])
        config = self.best_config(best)
        header = (f"# jewelclf tune: the best of {len(done)} trials (trial #{best['number']}, "
                  f"{SEARCH_DIR}/trial_{best['trial']}, "
                  f"{self.objective} {best['score']:.4f} on the validation split)\n"
                  f"# Use it as is: jewelclf fit DATA --run-dir RUN --config {BEST_CONFIG}\n")
        fsio.atomic_write_text(self.run_dir / BEST_CONFIG, header + config.to_yaml())
        self.plot(rows)
        failed = len(rows) - len(done)
        fast = (f"on (the frozen backbone's features computed once, in {fast_seconds:.1f}s)"
                if fast_seconds is not None else "off")
        space_lines = [f"- `{n}`: {self.space[n]}" for n in self.names]
        report = "\n".join([
            f"# Tuning report: {self.run_dir.name}",
            "",
            f"- tuner: {settings.tuner}, objective: {self.objective} (validation split), "
            f"{settings.executions_per_trial} execution(s) per trial",
            f"- trials: {len(rows)} ({len(done)} completed, {failed} failed)",
            f"- search wall time: {search_seconds:.0f}s; fast mode: {fast}",
            f"- best: trial #{best['number']} (`{SEARCH_DIR}/trial_{best['trial']}`), "
            f"{self.objective} {best['score']:.4f} -> "
            f"[`{BEST_CONFIG}`]({BEST_CONFIG})",
            f"- every trial: [`{TRIALS_CSV}`]({TRIALS_CSV}); keras-tuner's state: `{SEARCH_DIR}/`",
            "",
            f"## Top {min(TOP, len(done))} trials",
            "",
            self.table(rows, markdown=True),
            "",
            "## Search space",
            "",
            *space_lines,
            "",
            "## Score against each hyperparameter",
            "",
            f"![score against each hyperparameter]({PLOT})",
            "",
            "## Next",
            "",
            f"`jewelclf fit DATA --run-dir RUN --config {self.run_dir / BEST_CONFIG}` trains the "
            f"best configuration in full and scores it on the test split.",
            "",
        ])
        fsio.atomic_write_text(self.run_dir / REPORT, report)
        log(f"top trials by {self.objective} ({len(done)} completed, {failed} failed):")
        log(self.table(rows, markdown=False))
        log(f"wrote {self.run_dir / TRIALS_CSV}, {self.run_dir / REPORT} and {self.run_dir / PLOT}")
        return {"trial": best["trial"], self.objective: best["score"], "trials": len(rows),
                "completed": len(done)}
