"""Compare runs: one table (and one picture) of the runs in the MLflow store.

    python -m cifarpipe.commands.compare                      # runs of params.yaml's tracking.experiment
    python -m cifarpipe.commands.compare --filter "tags.dvc_experiment = 'lr-3e-3'" --csv runs.csv --png val.png

A row per run: name, DVC experiment, status, the params (in force) that differ between the listed
runs (only those), the validation accuracy of the run's model and the epoch of its weights, the
best validation accuracy, test accuracy and training seconds; ranked by the model's validation
accuracy (`--by` another column). Validation picks, the test set confirms: ranking by test accuracy
makes the test set a selection criterion, so it is an option, not the default.
The table and the plot are built from plain values (`tracking.runs.StoredRun`); only `main` reads the store.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from cifarpipe.tracking.runs import StoredRun

FIXED_BEFORE = ["run", "run_id", "dvc_experiment", "status"]
FIXED_AFTER = ["model_val_accuracy", "weights_epoch", "best_val_accuracy", "test_accuracy", "train_seconds"]
# What --by can rank by: (what the column is, True when higher is better).
RANKINGS = {"model_val_accuracy": ("the validation accuracy of each run's model, the weights of its weights_epoch",
                                   True),
            "best_val_accuracy": ("each run's highest validation accuracy over its epochs", True),
            "test_accuracy": ("test accuracy", True),
            "train_seconds": ("training seconds", False)}
_MISSING = "-"


def weights_epoch(run: StoredRun) -> float:
    """The epoch of the run's model weights (tag weights_epoch); without the tag, its last epoch,
    whose weights the model then holds."""
    if "weights_epoch" in run.tags:
        return float(run.tags["weights_epoch"])
    steps = [step for step, _ in run.histories.get("val_accuracy", [])]
    return float(max(steps)) if steps else math.nan


def model_val_accuracy(run: StoredRun) -> float:
    """The validation accuracy of the run's model: metric model_val_accuracy, else the validation
    accuracy logged at the epoch of its weights."""
    if "model_val_accuracy" in run.metrics:
        return run.metrics["model_val_accuracy"]
    epoch = weights_epoch(run)
    return next((v for step, v in run.histories.get("val_accuracy", []) if step == epoch), math.nan)


def best_val_accuracy(run: StoredRun) -> float:
    history = [v for _, v in run.histories.get("val_accuracy", [])]
    if history:
        return max(history)
    return run.metrics.get("best_val_accuracy", math.nan)


def train_seconds(run: StoredRun) -> float:
    """Sum of the epochs' seconds (a resumed run's pause not counted), else the run's end - start."""
    seconds = [v for _, v in run.histories.get("epoch_seconds", [])]
    if seconds:
        return float(sum(seconds))
    if run.start_ms and run.end_ms:
        return (run.end_ms - run.start_ms) / 1000
    return math.nan


def differing_params(runs: Sequence[StoredRun]) -> list[str]:
    """Param names whose value is not the same in every run (absent counts as a value), sorted."""
    keys = sorted(set().union(*(r.params_in_force for r in runs))) if runs else []
    return [k for k in keys if len({r.params_in_force.get(k, _MISSING) for r in runs}) > 1]


def build_table(runs: Sequence[StoredRun], by: str = "model_val_accuracy") -> pd.DataFrame:
    """One row per run, ranked by column `by` (one of RANKINGS: best first; runs without a value last)."""
    params = differing_params(runs)
    rows = [{"run": r.name, "run_id": r.run_id[:8], "dvc_experiment": r.tags.get("dvc_experiment", _MISSING),
             "status": r.status, **{k: r.params_in_force.get(k, _MISSING) for k in params},
             "model_val_accuracy": model_val_accuracy(r), "weights_epoch": weights_epoch(r),
             "best_val_accuracy": best_val_accuracy(r), "test_accuracy": r.metrics.get("test_accuracy", math.nan),
             "train_seconds": train_seconds(r)} for r in runs]
    table = pd.DataFrame(rows, columns=FIXED_BEFORE + params + FIXED_AFTER)
    return table.sort_values(by, ascending=not RANKINGS[by][1], na_position="last", kind="stable"
                             ).reset_index(drop=True)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: accuracies with 4 decimals, epochs whole, seconds with 1 decimal, '-' where
    a value is missing."""
    out = table.astype(object).copy()
    for col, fmt in (("model_val_accuracy", "{:.4f}"), ("weights_epoch", "{:.0f}"), ("best_val_accuracy", "{:.4f}"),
                     ("test_accuracy", "{:.4f}"), ("train_seconds", "{:.1f}")):
        out[col] = [_MISSING if pd.isna(v) else fmt.format(v) for v in table[col]]
    return out.astype(str)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `formatted(table)` (no extra dependency)."""
    text = formatted(table)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in text.columns) + " |", "|" + "---|" * len(text.columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def curves_png(curves: Sequence[tuple[str, Sequence[tuple[int, float]]]], path: Path,
               title: str = "validation accuracy per epoch") -> None:
    """One line per run (name in the legend): validation accuracy against epoch."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cifarpipe import atomic

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, points in curves:
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(points for _, points in curves):
        # Outside the axes when many runs, so the legend never hides the curves.
        many = len(curves) > 8
        ax.legend(fontsize=8, loc="upper left" if many else "lower right",
                  bbox_to_anchor=(1.01, 1) if many else None)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _default_experiment(params_path: Path) -> str | None:
    """params.yaml's tracking.experiment, if there is such a file and key (no validation: reading only)."""
    import yaml

    try:
        raw = yaml.safe_load(params_path.read_text())
        return str(raw["tracking"]["experiment"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cifarpipe.commands.compare", description=__doc__.splitlines()[0],
                                 epilog="Store: MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow's default).")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--experiment", help="MLflow experiment name (default: tracking.experiment of params.yaml)")
    which.add_argument("--all-experiments", action="store_true", help="runs of every experiment")
    ap.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"tags.dvc_experiment = 'lr-3e-3'\" "
                                                 "or \"attributes.run_name LIKE 'lr%%'\"")
    ap.add_argument("--by", choices=list(RANKINGS), default="model_val_accuracy",
                    help="the column to rank by (default model_val_accuracy: the validation accuracy of each run's "
                         "model; train_seconds: fewest first, the others: highest first)")
    ap.add_argument("--max-runs", type=int, default=100, help="at most this many runs, newest first (default 100)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="where the default experiment is read")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV (raw numbers)")
    ap.add_argument("--md", type=Path, help="also write the table as Markdown")
    ap.add_argument("--png", type=Path, help="also write the runs' validation-accuracy curves as a PNG")
    args = ap.parse_args(argv)
    if args.max_runs < 1:
        ap.error("--max-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cifarpipe import atomic
    from cifarpipe.tracking.runs import read_runs
    from cifarpipe.tracking.store import tracking_uri

    args = parse_args(argv)
    experiment = None if args.all_experiments else (args.experiment or _default_experiment(args.params))
    runs = read_runs(experiment, args.filter, args.max_runs + 1)  # one more: whether any were left out
    more, runs = len(runs) > args.max_runs, runs[:args.max_runs]
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not runs:
        print(f"no runs in {where} of {tracking_uri()}" + (f" matching {args.filter!r}" if args.filter else "")
              + ": train one with `dvc repro`, or widen the choice (--all-experiments, --filter)", file=sys.stderr)
        return 1
    table = build_table(runs, args.by)
    what, higher_first = RANKINGS[args.by]
    print(f"{len(runs)} run{'s' if len(runs) != 1 else ''} of {where} in {tracking_uri()}, ranked by {args.by} "
          f"({what}), {'highest' if higher_first else 'lowest'} first:")
    print(formatted(table).to_string(index=False))
    if more:
        print(f"note: only the newest {args.max_runs} matching run(s) are listed; more match (--max-runs N, --filter)",
              file=sys.stderr)
    if args.csv:
        atomic.write_text(args.csv, table.to_csv(index=False))
        print(f"table -> {args.csv}")
    if args.md:
        atomic.write_text(args.md, to_markdown(table))
        print(f"table -> {args.md}")
    if args.png:
        by_id = {r.run_id[:8]: r for r in runs}
        repeated = set(table["run"][table["run"].duplicated()])  # same name twice: add the id to tell them apart
        curves_png([(f"{row.run} ({row.run_id})" if row.run in repeated else row.run,
                     by_id[row.run_id].histories.get("val_accuracy", [])) for row in table.itertuples()], args.png)
        print(f"validation curves -> {args.png}")
    return 0


def cli() -> None:
    """The console entry point: a UserError (missing store, bad filter) prints one line and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
