"""What a reproduction checks, as pure functions: whether a run's record can be reproduced, the
params.yaml its rerun gets, and the value-by-value comparison of the two runs (cifarpipe-reproduce)."""
from __future__ import annotations

import ast
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from cifarpipe.config import BASE_RECIPE, Params, UserError, flatten_mapping, read_yaml_text, unflatten

if TYPE_CHECKING:
    from cifarpipe.tracking.runs import StoredRun

# Per-epoch curves that a reproduction must give again (stages/train.py logs them, step = epoch).
# epoch_seconds and images_per_second are wall-clock: never equal twice, never compared.
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
TEST_METRICS = ("test_accuracy", "test_loss")  # the evaluate stage's, step 0
CHECKED_TAGS = ("data_md5", "split_hash")  # the data the run trained on: the same archive, the same split
COMMIT_TAGS = ("dvc_baseline_rev", "mlflow.source.git.commit")  # a DVC experiment's baseline first
# Params the reproduction sets on purpose: its own experiment, and no registered model version (a
# reproduction is a check, not a model for the registry's latest version). They change no training.
EXPERIMENT_KEY, REGISTERED_MODEL_KEY = "tracking.experiment", "tracking.registered_model"


@dataclass(frozen=True)
class Difference:
    name: str  # a metric, "param <key>" or "tag <key>"
    epoch: int | None
    recorded: str
    reproduced: str
    difference: str


def recorded_commit(run: StoredRun) -> str | None:
    for key in COMMIT_TAGS:
        value = run.tags.get(key, "")
        if value and value != "unknown":
            return value
    return None


def check_reproducible(run: StoredRun, commit_exists: Callable[[str], bool]) -> str:
    """The commit to reproduce `run` at; UserError saying why its record can't be reproduced: first
    what no rerun can fix (no commit, uncommitted code, a commit this repository lacks), then an
    unfinished run, then the data."""
    rid = run.run_id
    trained_by = run.tags.get("evaluation_of")  # a nested "-eval-" run (tracking.journal): it trained nothing
    if trained_by:
        raise UserError(f"run {rid} is an evaluation of run {trained_by}'s model with other evaluate params, not a "
                        f"training: reproduce the training run (cifarpipe-reproduce {trained_by})")
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


def record_notes(run: StoredRun) -> list[str]:
    """What a user must know before reading a reproduction's verdict on `run`."""
    notes = []
    changed = {k: v for k, v in run.tags.items() if k.startswith("param_changed.")}
    if changed:
        notes.append(f"run {run.run_id} was continued with params changed ("
                     + ", ".join(f"{k.removeprefix('param_changed.')} {v}" for k, v in sorted(changed.items()))
                     + "): the reproduction runs with the values in force at its end, so the epochs it ran "
                     "before the change may differ by float rounding")
    if run.tags.get("reuses_run"):
        notes.append(f"run {run.run_id} trained nothing itself: its weights and curves are run "
                     f"{run.tags['reuses_run']}'s (tag reuses_run); the reproduction trains with this run's params")
    return notes


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
    committed = flatten_mapping(committed_raw)
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
    return ParamsPlan(unflatten(values), tuple(on_purpose), tuple(notes))


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


def compare(recorded: StoredRun, reproduced: StoredRun, tolerance: float = 0.0,
            ignore_params: Sequence[str] = ()) -> list[Difference]:
    """Every difference between a run and its reproduction: per-epoch curve values, test metrics,
    the data tags and the commit, and the pipeline's params (except `ignore_params`, set on purpose;
    see pipeline_params). Values are
    equal when exactly equal (tolerance 0) or within `tolerance` (absolute); NaN equals NaN."""
    out: list[Difference] = []
    for name in CURVES:
        rec, rep = by_step(recorded.histories.get(name, [])), by_step(reproduced.histories.get(name, []))
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
    rec_params, rep_params = pipeline_params(recorded.params_in_force), pipeline_params(reproduced.params_in_force)
    for key in sorted(set(rec_params) | set(rep_params)):
        a, b = rec_params.get(key), rep_params.get(key)
        if key not in ignore_params and a != b:
            out.append(Difference(f"param {key}", None, a or "-", b or "-", "differs"))
    return out


def pipeline_params(params: dict[str, str]) -> dict[str, str]:
    """The params of the pipeline (params.yaml's keys: `recipe` and the dotted keys of its
    sections), without what else a run's params hold: `mlflow run .` logs its entry point's own
    parameters (epochs, batch_size, lr, ... as passed with -P, '' when not), and an MLflow model
    logs its model_config (device). Those describe how the run was started, not what it trained."""
    sections = {name for name, field in Params.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}
    scalars = set(Params.model_fields) - sections  # `recipe`
    return {k: v for k, v in params.items() if k in scalars or ("." in k and k.split(".")[0] in sections)}


def by_step(history: list[tuple[int, float]]) -> dict[int, list[float]]:
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
