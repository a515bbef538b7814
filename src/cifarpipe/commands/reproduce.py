"""Reproduce a run: rerun the pipeline at its commit with its params in a fresh git worktree, compare the metrics.

    cifarpipe-reproduce RUN_ID        # = python -m cifarpipe.commands.reproduce RUN_ID

Reads the run from the MLflow store (MLFLOW_TRACKING_URI, else ./mlflow.db), checks that its record
can be reproduced (finished with a test accuracy; a commit this repository has; no uncommitted code
changes, which train records in the tags git_dirty_code / git_dirty_files; a consistent data MD5),
checks the commit out with `git worktree add --detach` in a temporary folder outside the workspace,
writes the run's logged params into that worktree's params.yaml, reuses the workspace's archive when
its MD5 is the run's (nothing downloaded again; the download stage verifies it either way) and runs
`dvc repro` there. The new run goes into the same store, experiment `<experiment>-reproduce`
(beside the original in `mlflow ui`, out of the original experiment's lists), tagged
`reproduces=<run id>`, and registers no model version. Then the test metrics and every per-epoch
value (train/val loss and accuracy, lr; not the wall-clock epoch_seconds and images_per_second) are
compared: "reproduced exactly" (exit 0), or a table of the differences (exit 1). The workspace, its
params.yaml, outputs and dvc.lock are never touched; the worktree is removed at the end (--keep: kept).

The comparison and the params plan are pure functions; only main() and reproduce() touch git, DVC
and MLflow (runs are read with cifarpipe.tracking.runs).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cifarpipe.commands.reproduction import (CURVES, EXPERIMENT_KEY, REGISTERED_MODEL_KEY, by_step, check_reproducible,
                                             compare, format_differences, plan_params, record_notes)
from cifarpipe.config import BASE_RECIPE, RECIPES_DIR, UserError, read_recipe, read_yaml_text

if TYPE_CHECKING:
    from cifarpipe.tracking.runs import StoredRun

DEFAULT_ARCHIVE = "data/raw/cifar-10-python.tar.gz"  # dvc.yaml's download --archive, if it can't be read

# ------------------------------------------------------------ git, DVC and MLflow (main only)
def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=check, timeout=120)


def _repo_root() -> Path:
    try:
        return Path(_git(Path.cwd(), "rev-parse", "--show-toplevel").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        raise UserError("not in a git repository: run this in the project's checkout") from None


def commit_exists(repo: Path, commit: str) -> bool:
    return _git(repo, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0


def _absolute_uri(uri: str) -> str:
    """The store's URI for a process with another working directory (MLflow's default is relative)."""
    if uri.startswith("sqlite:///"):
        path, _, query = uri[len("sqlite:///"):].partition("?")
        db = Path(path)
        if not db.is_absolute():
            db = (Path.cwd() / db).resolve()
        if not db.is_file():
            raise UserError(f"no MLflow store at {db} ({uri}): run this command in the repository root, "
                            "or set MLFLOW_TRACKING_URI")
        return f"sqlite:///{db}" + (f"?{query}" if query else "")
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return str(Path(uri).resolve())
    return uri


def _archive_path(worktree: Path) -> str:
    """The download stage's --archive, from dvc.yaml (the one place for paths)."""
    import yaml

    try:
        cmd = shlex.split(yaml.safe_load((worktree / "dvc.yaml").read_text())["stages"]["download"]["cmd"])
        return cmd[cmd.index("--archive") + 1]
    except (OSError, KeyError, ValueError, IndexError, TypeError, yaml.YAMLError):
        return DEFAULT_ARCHIVE


def _child_env(worktree: Path, uri: str, on_cpu: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DVC_") and k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The commit's library, not the installed one (an editable install points at the workspace's src/).
    env["PYTHONPATH"] = os.pathsep.join([str(worktree / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["MLFLOW_TRACKING_URI"] = uri
    env["TQDM_DISABLE"] = "1"  # progress bars are \r-redrawn lines: noise in a relayed log
    env["PYTHONUNBUFFERED"] = "1"
    if on_cpu:  # a CPU run reproduced on a GPU machine would pick cuda under train.device: auto
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _remove_worktree(repo: Path, worktree: Path) -> None:
    _git(repo, "worktree", "remove", "--force", str(worktree), check=False)
    shutil.rmtree(worktree, ignore_errors=True)
    _git(repo, "worktree", "prune", check=False)


def _run_pipeline(worktree: Path, env: dict[str, str]) -> None:
    """`dvc repro` in the worktree, its output relayed; UserError with its last lines if it fails.
    --force --no-run-cache: every stage runs, none is restored from a cache (that would hand back
    the original run's outputs, and the original run id)."""
    cmd = ["dvc", "repro", "--force", "--no-run-cache"]
    print(f"$ {' '.join(cmd)}   (in {worktree})", flush=True)
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(cmd, cwd=worktree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  | {line.rstrip()}", flush=True)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # Ctrl-C or an error here: the pipeline stops too
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        raise UserError(f"the pipeline failed in the worktree (dvc repro exited {code}); its last lines:\n  "
                        + "\n  ".join(tail))


def reproduce(client, original: StoredRun, repo: Path, commit: str, uri: str, experiment: str, archive: Path | None,
              keep: bool) -> tuple[StoredRun, tuple[str, ...]]:
    """Run the pipeline for `original` in a fresh worktree at `commit`; the reproduced run and the
    params it set on purpose."""
    from cifarpipe.data import archive as data
    from cifarpipe.tracking.runs import read_run

    worktree = Path(tempfile.mkdtemp(prefix=f"cifarpipe-reproduce-{original.run_id[:8]}-"))
    try:
        _git(repo, "worktree", "add", "--detach", str(worktree), commit)
        params_path = worktree / "params.yaml"
        committed = read_yaml_text(params_path.read_text(), f"{commit[:12]}:params.yaml")
        recipe = original.params.get("recipe", BASE_RECIPE)
        try:
            recipe_values = read_recipe(recipe, worktree / RECIPES_DIR) if recipe != BASE_RECIPE else {}
        except UserError:
            recipe_values = None
        plan = plan_params(committed, original.params_in_force, experiment, recipe_values)
        import yaml

        params_path.write_text(yaml.safe_dump(plan.raw, sort_keys=False))
        for note in plan.notes:
            print(f"note: {note}")

        md5 = original.params["data.md5"]
        target = worktree / _archive_path(worktree)
        source = archive if archive is not None else repo / _archive_path(worktree)
        if source.is_file() and data.md5_of(source) == md5:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source.resolve())  # the download stage verifies it, and fetches nothing
            print(f"data: {source} (md5 {md5}, the run's)")
        elif archive is not None:
            raise UserError(f"{archive}: not the run's data (md5 {md5} expected"
                            + (f", got {data.md5_of(archive)})" if archive.is_file() else "; no such file)"))
        else:
            print(f"data: {source} is " + ("not the run's archive" if source.is_file() else "missing")
                  + f"; the download stage fetches {original.params.get('data.url')} and checks md5 {md5} "
                  "(or pass --archive PATH)")

        env = _child_env(worktree, uri, on_cpu=original.tags.get("device") == "cpu")
        _run_pipeline(worktree, env)
        new_id = (worktree / "outputs" / "run_id.txt").read_text().strip()
        if new_id == original.run_id:
            raise UserError(f"the pipeline in the worktree did not train (it reported run {new_id}, the original)")
        client.set_tag(new_id, "reproduces", original.run_id)
        return read_run(client, new_id, CURVES), plan.set_on_purpose
    finally:
        if keep:
            print(f"worktree kept: {worktree} (remove it with `git worktree remove --force {worktree}`)")
        else:
            _remove_worktree(repo, worktree)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cifarpipe-reproduce", description=__doc__.splitlines()[0],
                                 epilog="Store: MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow's default). Exit codes: "
                                        "0 reproduced, 1 differences, 2 not reproducible (the reason is printed).")
    ap.add_argument("run_id", help="the MLflow run to reproduce")
    ap.add_argument("--experiment", help="MLflow experiment of the reproduced run (default: <the run's>-reproduce)")
    ap.add_argument("--archive", type=Path, help="the CIFAR-10 archive to use (default: the workspace's "
                                                 "data/raw/cifar-10-python.tar.gz if its md5 is the run's)")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="absolute difference accepted per value (default 0: bitwise, as CPU runs repeat; "
                         "GPU runs without train.deterministic need e.g. 0.02)")
    ap.add_argument("--keep", action="store_true", help="keep the worktree (its path is printed)")
    ap.add_argument("--compare-with", metavar="RUN_ID", help="compare with this run (an earlier reproduction) "
                                                             "instead of running the pipeline")
    args = ap.parse_args(argv)
    if args.tolerance < 0 or math.isnan(args.tolerance):
        ap.error("--tolerance must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from cifarpipe.tracking.runs import read_run
    from cifarpipe.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, connect, tracking_uri

    args = parse_args(argv)
    repo = _repo_root()
    uri = _absolute_uri(tracking_uri())
    os.environ["MLFLOW_TRACKING_URI"] = uri  # this process and the pipeline's: one store
    client = connect()
    original = read_run(client, args.run_id, CURVES)
    commit = check_reproducible(original, lambda c: commit_exists(repo, c))
    for note in record_notes(original):
        print(f"note: {note}")
    ignore: tuple[str, ...] = (EXPERIMENT_KEY, REGISTERED_MODEL_KEY)
    if args.compare_with:
        new = read_run(client, args.compare_with, CURVES)
    else:
        experiment = args.experiment or f"{original.experiment}-reproduce"
        if client.get_experiment_by_name(experiment) is None:
            # Created here, in the workspace: its artifacts go where the store's others go, not into the worktree.
            client.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        print(f"reproducing run {original.run_id} ({original.experiment}) at commit {commit[:12]}; the new run goes "
              f"to experiment {experiment!r} in {uri}", flush=True)
        new, ignore = reproduce(client, original, repo, commit, uri, experiment, args.archive, args.keep)
    diffs = compare(original, new, args.tolerance, ignore)
    exact = not diffs and args.tolerance == 0
    verdict = "exact" if exact else ("within tolerance" if not diffs else f"{len(diffs)} differences")
    if not args.compare_with:
        client.set_tag(new.run_id, "reproduction", verdict)
    if original.tags.get("device") != new.tags.get("device"):
        print(f"note: trained on {original.tags.get('device')}, reproduced on {new.tags.get('device')}")
    epochs = len(by_step(original.histories.get("val_accuracy", [])))
    if not diffs:
        print(f"reproduced {'exactly' if exact else f'within {args.tolerance}'}: run {new.run_id} = run "
              f"{original.run_id} (test accuracy {new.metrics['test_accuracy']:.4f}, {epochs} epochs of "
              f"{', '.join(CURVES)})")
        return 0
    print(f"NOT reproduced: run {new.run_id} differs from run {original.run_id} in {len(diffs)} value(s)"
          + (f" (tolerance {args.tolerance})" if args.tolerance else "") + ":")
    print(format_differences(diffs))
    return 1


def cli() -> None:
    """The console entry point: a record that can't be reproduced prints one reason and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
