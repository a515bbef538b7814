"""airbench's log table -> its figures: mean test accuracy with TTA and median time of its "eval" rows.

airbench94 prints one table row per epoch and one "eval" row per run, whose last column is its own
timer (total_time_seconds: CUDA events around the whitening init, each epoch's training loop and the
final TTA test pass). The first `skip` runs are dropped from the figures and listed: the first run in
a process pays CUDA's and cuDNN's start-up (7.9 s against 2.3 s on an H200).

  python benchmarks/airbench_summary.py airbench94.log airbench94.json 1   # prints the mean accuracy
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TIMER = ("its total_time_seconds: CUDA events around the whitening init, each epoch's training loop (its "
         "loader's augmentation included) and the final TTA test pass; not the model's building, the data "
         "loading or the per-epoch evaluation")


def summarize(log_text: str, skip: int) -> dict | None:
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in log_text.splitlines() if line.startswith("|")]
    head = next((r for r in rows if "tta_val_acc" in r), None)
    runs = [r for r in rows if head and len(r) == len(head) and r[1] == "eval"]
    if not runs[skip:]:
        return None
    acc, sec = head.index("tta_val_acc"), len(head) - 1
    kept = runs[skip:]
    accs, secs = [float(r[acc]) for r in kept], [float(r[sec]) for r in kept]
    return {"runs": len(kept), "tta_accuracy_mean": statistics.mean(accs), "accuracies": accs,
            "seconds_median": statistics.median(secs), "seconds": secs,
            "dropped_first_runs": [{"tta_accuracy": float(r[acc]), "seconds": float(r[sec])} for r in runs[:skip]],
            "timer": TIMER}


def main() -> None:
    log, out, skip = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    summary = summarize(log.read_text(errors="replace"), skip)
    if summary:
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{summary['tta_accuracy_mean']:.4f}")


if __name__ == "__main__":
    main()
