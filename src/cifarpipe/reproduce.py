"""Reproduce a run: rerun the pipeline at its commit with its params in a fresh git worktree, compare the metrics.

    cifarpipe-reproduce RUN_ID        # = python -m cifarpipe.reproduce RUN_ID

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

The comparison and the params plan are pure functions; only main() touches git, DVC and MLflow (its
few MLflow calls are here: tracking.py has no read-one-run function).
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarpipe.config import BASE_RECIPE, RECIPES_DIR, UserError, read_recipe, read_yaml_text

# Per-epoch curves that a reproduction must give again (stages/train.py logs them, step = epoch).
# epoch_seconds and images_per_second are wall-clock: never equal twice, never compared.
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
TEST_METRICS = ("test_accuracy", "test_loss")  # the evaluate stage's, step 0
CHECKED_TAGS = ("data_md5", "split_hash")  # the data the run trained on: the same archive, the same split
COMMIT_TAGS = ("dvc_baseline_rev", "mlflow.source.git.commit")  # a DVC experiment's baseline first
# Params the reproduction sets on purpose: its own experiment, and no registered model version (a
# reproduction is a check, not a model for the registry's latest version). They change no training.
EXPERIMENT_KEY, REGISTERED_MODEL_KEY = "tracking.experiment", "tracking.registered_model"
DEFAULT_ARCHIVE = "data/raw/cifar-10-python.tar.gz"  # dvc.yaml's download --archive, if it can't be read


@dataclass(frozen=True)
class Run:
    """What a reproduction needs of one MLflow run, as plain values."""
    run_id: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    histories: dict[str, list[tuple[int, float]]]  # (step, value) of each curve, every logged value


@dataclass(frozen=True)
class Difference:
    name: str  # a metric, "param <key>" or "tag <key>"
    epoch: int | None
    recorded: str
    reproduced: str
    difference: str


def recorded_commit(run: Run) -> str | None:
    for key in COMMIT_TAGS:
        value = run.tags.get(key, "")
        if value and value != "unknown":
            return value
    return None


def check_reproducible(run: Run, commit_exists: Callable[[str], bool]) -> str:
    """The commit to reproduce `run` at; UserError saying why its record can't be reproduced: first
    what no rerun can fix (no commit, uncommitted code, a commit this repository lacks), then an
    unfinished run, then the data."""
    rid = run.run_id
    commit = recorded_commit(run)
    if commit is None:
        raise UserError(f"run {rid} records no git commit (trained outside a git checkout): its code can't be recreated")
    dirty_code = run.tags.get("git_dirty_code")
    if dirty_code == "true":
        files = run.tags.get("git_dirty_code_files") or run.tags.get("git_dirty_files", "?")
        diff = run.tags.get("git_diff_sha256")
        raise UserError(f"run {rid} was trained with uncommitted code changes ({files}"
                        + (f"; diff sha256 {diff}" if diff else "") + f"): commit {commit[:12]} does not hold the "
                        "code that trained it, so it can't be reproduced. Commit code changes before training.")
    if dirty_code is None and run.tags.get("git_dirty") != "false":
        raise UserError(f"run {rid} was trained with uncommitted changes (tag git_dirty={run.tags.get('git_dirty')}) "
                        "and recorded before runs told code changes apart from params.yaml ones (no tag "
                        f"git_dirty_code): the record can't tell whether its code was commit {commit[:12]}'s, "
                        "so it is not reproduced")
    if not commit_exists(commit):
        raise UserError(f"run {rid} was trained at commit {commit}, which this repository does not have: fetch it "
                        "(`git fetch`), or run this in the clone it was trained in")
    if run.status != "FINISHED":
        raise UserError(f"run {rid} did not finish (status {run.status}): there are no final metrics to compare with")
    if "test_accuracy" not in run.metrics:
        raise UserError(f"run {rid} has no test_accuracy (its evaluate stage never delivered one): "
                        "nothing to compare a reproduction with")
    md5 = run.params.get("data.md5")
    if not md5:
        raise UserError(f"run {rid} logged no params (no data.md5): nothing to recreate params.yaml from")
    if run.tags.get("data_md5", md5) != md5:
        raise UserError(f"run {rid}'s record is inconsistent: tag data_md5 {run.tags['data_md5']} but param "
                        f"data.md5 {md5}; the data it trained on is unknown")
    return commit


def _leaves(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict) and (raw or not prefix):
        out: dict[str, Any] = {}
        for k, v in raw.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: raw}


def typed_value(logged: str, committed: Any) -> Any:
    """A logged param (MLflow keeps str(value)) as the type params.yaml has at the commit."""
    try:
        if isinstance(committed, bool):
            if logged in ("True", "False"):
                return logged == "True"
        elif isinstance(committed, int):
            return int(logged)
        elif isinstance(committed, float):
            return float(logged)
        elif isinstance(committed, str):
            return logged
        elif isinstance(committed, (list, tuple)):
            return list(ast.literal_eval(logged))
    except (ValueError, SyntaxError):
        pass
    return read_yaml_text(logged, "a logged param")  # a value whose type an override changed


@dataclass(frozen=True)
class ParamsPlan:
    raw: dict[str, Any]  # params.yaml's new mapping
    set_on_purpose: tuple[str, ...]  # keys whose logged value was not written (and why, in notes)
    notes: tuple[str, ...]


def plan_params(committed_raw: dict[str, Any], logged: dict[str, str], experiment: str,
                recipe_values: dict[str, Any] | None) -> ParamsPlan:
    """params.yaml for the reproduction: the commit's file with every logged value written in.

    The logged params are the values in force (after the recipe); params.yaml's `recipe` then applies
    its file on top. Keeping the logged recipe is exact only when its values (`recipe_values`, read
    from the commit's recipes/<name>.yaml; None when it can't be read) are the logged ones; otherwise
    the base recipe (no changes) is written, and the logged values alone give the same training.
    """
    committed = _leaves(committed_raw)
    # Logged keys params.yaml lacks are not the pipeline's (MLflow logs the model's model_config,
    # e.g. `device`, as params too); a key of params.yaml the run did not log has no value to write.
    missing = sorted(set(committed) - set(logged))
    if missing:
        raise UserError(f"the run logged no value for {', '.join(missing)}, which params.yaml has at its commit: "
                        "the record does not describe that commit's pipeline")
    values = {k: typed_value(logged[k], v) for k, v in committed.items()}
    notes, on_purpose = [], [EXPERIMENT_KEY, REGISTERED_MODEL_KEY]
    values[EXPERIMENT_KEY] = experiment
    values[REGISTERED_MODEL_KEY] = ""
    recipe = values.get("recipe")
    if recipe and recipe != BASE_RECIPE:
        agrees = recipe_values is not None and all(
            k in logged and str(_as_logged(v)) == logged[k] for k, v in recipe_values.items())
        if not agrees:
            values["recipe"] = BASE_RECIPE
            on_purpose.append("recipe")
            notes.append(f"recipe {recipe!r} at this commit does not give the run's logged values: params.yaml gets "
                         f"recipe {BASE_RECIPE!r} and the logged values themselves (the same training)")
    raw: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return ParamsPlan(raw, tuple(on_purpose), tuple(notes))


def _as_logged(value: Any) -> Any:
    """A recipe's value the way config.flatten logs it (lists for tuples; floats for a float key
    written as an int are not guessed: such a recipe falls back to the base recipe, still exact)."""
    return list(value) if isinstance(value, tuple) else value


def _same(a: float, b: float, tolerance: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if tolerance == 0 else abs(a - b) <= tolerance


def _num(v: float) -> str:
    return repr(float(v))  # the shortest text that reads back to the same float: differences stay visible


def compare(recorded: Run, reproduced: Run, tolerance: float = 0.0,
            ignore_params: Sequence[str] = ()) -> list[Difference]:
    """Every difference between a run and its reproduction: per-epoch curve values, test metrics,
    the data tags and the commit, and params (except `ignore_params`, set on purpose). Values are
    equal when exactly equal (tolerance 0) or within `tolerance` (absolute); NaN equals NaN."""
    out: list[Difference] = []
    for name in CURVES:
        rec, rep = _by_step(recorded.histories.get(name, [])), _by_step(reproduced.histories.get(name, []))
        for step in sorted(set(rec) | set(rep)):
            a, b = rec.get(step, []), rep.get(step, [])
            if len(a) == 1 and len(b) == 1 and _same(a[0], b[0], tolerance):
                continue
            diff = f"{b[0] - a[0]:+.3g}" if len(a) == 1 and len(b) == 1 else "-"
            out.append(Difference(name, step, _values(a), _values(b), diff))
    for name in TEST_METRICS:
        a, b = recorded.metrics.get(name), reproduced.metrics.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None or not _same(a, b, tolerance):
            diff = f"{b - a:+.3g}" if a is not None and b is not None else "-"
            out.append(Difference(name, None, "-" if a is None else _num(a), "-" if b is None else _num(b), diff))
    for name, a, b in [("tag commit", recorded_commit(recorded), recorded_commit(reproduced))] + [
            (f"tag {k}", recorded.tags.get(k), reproduced.tags.get(k)) for k in CHECKED_TAGS]:
        if a != b:
            out.append(Difference(name, None, a or "-", b or "-", "differs"))
    for key in sorted(set(recorded.params) | set(reproduced.params)):
        a, b = recorded.params.get(key), reproduced.params.get(key)
        if key not in ignore_params and a != b:
            out.append(Difference(f"param {key}", None, a or "-", b or "-", "differs"))
    return out


def _by_step(history: list[tuple[int, float]]) -> dict[int, list[float]]:
    """Every distinct value logged at each step: an epoch logged twice with different values shows as both."""
    out: dict[int, list[float]] = {}
    for step, value in history:
        if not any(_same(value, v, 0.0) for v in out.setdefault(int(step), [])):
            out[int(step)].append(value)
    return out


def _values(values: list[float]) -> str:
    return " | ".join(_num(v) for v in values) if values else "-"


def format_differences(diffs: Sequence[Difference]) -> str:
    rows = [("metric", "epoch", "recorded", "reproduced", "difference")] + [
        (d.name, "-" if d.epoch is None else str(d.epoch), d.recorded, d.reproduced, d.difference) for d in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 2, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


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


def read_run(client, run_id: str) -> Run:
    from cifarpipe import tracking

    try:
        r = client.get_run(run_id)
        experiment = client.get_experiment(r.info.experiment_id).name
        histories = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in CURVES}
    except Exception as e:
        if tracking.is_not_found(e):
            raise UserError(f"no run {run_id} in the MLflow store {tracking.tracking_uri()}") from None
        raise UserError(f"the MLflow store {tracking.tracking_uri()} did not answer for run {run_id} "
                        f"({type(e).__name__})") from None
    return Run(run_id, experiment, r.info.status, dict(r.data.params), dict(r.data.tags), dict(r.data.metrics),
               histories)


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


def reproduce(client, original: Run, repo: Path, commit: str, uri: str, experiment: str, archive: Path | None,
              keep: bool) -> tuple[Run, tuple[str, ...]]:
    """Run the pipeline for `original` in a fresh worktree at `commit`; the reproduced run and the
    params it set on purpose."""
    from cifarpipe import data

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
        plan = plan_params(committed, original.params, experiment, recipe_values)
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
        return read_run(client, new_id), plan.set_on_purpose
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
    from cifarpipe import tracking

    args = parse_args(argv)
    repo = _repo_root()
    uri = _absolute_uri(tracking.tracking_uri())
    os.environ["MLFLOW_TRACKING_URI"] = uri  # this process and the pipeline's: one store
    client = tracking.connect()
    original = read_run(client, args.run_id)
    commit = check_reproducible(original, lambda c: commit_exists(repo, c))
    ignore: tuple[str, ...] = (EXPERIMENT_KEY, REGISTERED_MODEL_KEY)
    if args.compare_with:
        new = read_run(client, args.compare_with)
    else:
        experiment = args.experiment or f"{original.experiment}-reproduce"
        if client.get_experiment_by_name(experiment) is None:
            # Created here, in the workspace: its artifacts go where the store's others go, not into the worktree.
            client.create_experiment(experiment)
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
    epochs = len(_by_step(original.histories.get("val_accuracy", [])))
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
    from cifarpipe.cli import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
