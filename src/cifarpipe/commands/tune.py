"""Search hyperparameters with Optuna: trials of the train stage's training, pruned on validation accuracy.

    cifarpipe-tune tune/space.yaml                 # the study in outputs/tune/space.journal; rerun to continue it
    cifarpipe-tune tune/space.yaml --workers 2     # two processes share the study
    dvc exp run -S recipe=space                    # the winner through the pipeline (recipes/space.yaml)

The search file declares the space (dotted params.yaml keys), the number of trials, the epochs per
trial, the sampler and the pruner (cifarpipe.commands.tuning). Each trial trains params.yaml's
values (with its recipe) plus the trial's, validated by config.py, through the train stage's code
(pipeline.trial) on the split's training part; it is judged on the validation part only, never
the test set. After each epoch the trial reports its validation accuracy to Optuna, which may
prune it; train.early_stopping ends it as it ends the train stage (a complete trial). A trial's
value is the validation accuracy of the weights the reproduced pipeline keeps (evaluate.weights:
the best epoch's, or the last one's).

MLflow: one parent run for the study, one nested run per trial (tracking.study). The study lives
in an Optuna journal file, outputs/tune/<study>.journal: rerunning the command continues it (a
trial a kill interrupted is tried again). One command per study at a time (outputs/tune/<study>.lock);
--workers N runs N processes on the one journal. At the end the best trial becomes
recipes/<name>.yaml, so `dvc exp run -S recipe=<name>` trains it through the pipeline.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cifarpipe import atomic
from cifarpipe.commands import tuning
from cifarpipe.config import Params, UserError, flatten, load_params

JOURNAL_DIR = Path("outputs/tune")
MAX_FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing stops instead of spinning through the study
INTERRUPTED_EXIT = 130


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cifarpipe-tune", description=__doc__.splitlines()[0],
                                 epilog="Exit status: 0 the study has all its trials, 130 interrupted (rerun to "
                                        "continue), 2 a mistake in the search file or params.yaml.")
    ap.add_argument("space", type=Path, help="the search file, e.g. tune/space.yaml")
    ap.add_argument("--workers", type=int, default=1, help="processes training trials at once (default 1)")
    ap.add_argument("--recipe", help="the winner's recipe name: recipes/<name>.yaml (default: the study's name)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default: params.yaml)")
    ap.add_argument("--worker-of", help=argparse.SUPPRESS)  # internal: a worker process of the study's parent run
    ap.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: at least 1")
    spec, study_name = tuning.load_spec(args.space)
    base = load_params(args.params)
    tuning.check_spec(spec, base, args.space)
    journal = JOURNAL_DIR / f"{study_name}.journal"
    if args.worker_of:
        return work(spec, study_name, journal, args.worker_of, base, args.worker_index, args.workers)
    recipe = recipe_path(args.params, args.recipe or study_name, study_name)
    with study_lock(journal) as lock_fd:
        return run_study(args, spec, study_name, journal, base, recipe, lock_fd)


def recipe_path(params_path: Path, name: str, study: str) -> Path:
    """recipes/<name>.yaml; refused before any work if a recipe of that name was not written by this study."""
    path = params_path.parent / "recipes" / f"{name}.yaml"
    if not tuning.NAME.match(name):
        raise UserError(f"--recipe {name!r}: letters, digits, '.', '_' and '-' only")
    if path.exists() and tuning.written_by(path.read_text()) != study:
        raise UserError(f"{path} exists and was not written by study {study!r}: choose another name with --recipe")
    return path


@contextlib.contextmanager
def study_lock(journal: Path) -> Iterator[int]:
    """One cifarpipe-tune command per study at a time. Its workers inherit the lock (run_workers), so
    a worker orphaned by a killed command still holds it: a trial left RUNNING in the journal when
    the lock is free belongs to a process that is gone, and so does Optuna's own lock file of the
    journal (a kill while a trial wrote to it), which is removed. Yields the lock's descriptor."""
    import fcntl

    journal.parent.mkdir(parents=True, exist_ok=True)
    with open(journal.with_suffix(".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another cifarpipe-tune is running study {journal.stem} ({journal}), or a worker "
                            "of a killed one is still training; use --workers N for parallel trials") from None
        stale = Path(f"{journal}.lock")  # optuna.storages.journal's lock: a symbolic link while held
        if os.path.lexists(stale):
            stale.unlink()
            print(f"removed {stale}: Optuna's lock of the journal, left by a process killed while writing it")
        yield f.fileno()


def open_study(spec: tuning.TuneSpec, name: str, journal: Path, worker_index: int | None = None):
    """The study in its journal file (created if new). A worker's sampler is seeded with the search
    file's seed plus the trials already in the study (a continued study draws new points, not the
    first run's again) plus 1000 per worker index (workers draw different points)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this command prints its own lines
    p = spec.pruner
    # Optuna may prune at step == n_warmup_steps; our steps are epochs counted from 1, so the first
    # warmup_epochs epochs are safe with n_warmup_steps = warmup_epochs + 1.
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs + 1)
              if p.name == "median" else optuna.pruners.NopPruner())
    # An absolute path: Optuna's lock is a symbolic link to the journal; a relative target resolves
    # from the link's folder, where Optuna's check for a stale lock (30 s) finds nothing and waits for ever.
    storage = JournalStorage(JournalFileBackend(str(journal.resolve())))
    study = optuna.create_study(study_name=name, storage=storage,
                                load_if_exists=True, direction="maximize", pruner=pruner)
    if worker_index is not None:
        s, seed = spec.sampler, spec.sampler.seed + len(study.trials) + 1000 * worker_index
        study.sampler = (optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed) if s.name == "tpe"
                         else optuna.samplers.RandomSampler(seed=seed))
    return study


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def prepare(study, spec: tuning.TuneSpec, spec_text: str, client) -> None:
    """A new study's first trials; an old one's trials that a kill left RUNNING or interrupted are
    marked FAIL (their MLflow runs INTERRUPTED) and queued again with the same values."""
    from optuna.trial import TrialState

    from cifarpipe.tracking import study as runs

    digest = hashlib.sha256(spec_text.encode()).hexdigest()[:12]
    if not study.trials:
        study.set_user_attr("spec_sha256", digest)
        for point in spec.first_trials:
            study.enqueue_trial(point)
    elif study.user_attrs.get("spec_sha256") != digest:
        print("note: the search file changed since this study began; its earlier trials stay in it")
    retried = list(study.user_attrs.get("retried", []))
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        if run_id := t.user_attrs.get("mlflow_run_id"):
            with contextlib.suppress(Exception):  # a run deleted meanwhile: nothing to mark
                runs.end_trial(client, run_id, "INTERRUPTED")
    interrupted = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.user_attrs.get("interrupted")]
    for t in stale + interrupted:
        if t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            retried.append(t.number)
            print(f"trial {t.number} was interrupted: queued again with the same values")
    study.set_user_attr("retried", retried)


def run_study(args: argparse.Namespace, spec: tuning.TuneSpec, name: str, journal: Path, base: Params,
              recipe: Path, lock_fd: int) -> int:
    from cifarpipe.tracking import store
    from cifarpipe.tracking import study as runs

    client = store.connect()
    study = open_study(spec, name, journal)
    prepare(study, spec, args.space.read_text(), client)
    parent = runs.open_parent(client, base.tracking.experiment, name, journal, tuning.settings(spec, args.space),
                              args.space, study.user_attrs.get("mlflow_run_id"))
    study.set_user_attr("mlflow_run_id", parent)
    done = finished(study)
    print(f"study {name} ({journal}): {done} of {spec.trials} trials finished; MLflow parent run {parent} in "
          f"{store.tracking_uri()} (experiment {base.tracking.experiment})", flush=True)
    interrupted = False
    try:
        if done < spec.trials:
            if args.workers == 1:
                interrupted = work(spec, name, journal, parent, base, 0, 1) == INTERRUPTED_EXIT
            else:
                run_workers(args, parent, lock_fd)
    except KeyboardInterrupt:
        interrupted = True
    study = open_study(spec, name, journal)  # the workers' trials, read back from the journal
    complete = finished(study) >= spec.trials and not interrupted
    written = summarise(study, spec, name, base, args.params, recipe, parent)
    runs.close_parent(client, parent, summary_metrics(study), summary_tags(study), written, complete)
    if not complete:
        print(f"stopped with {finished(study)} of {spec.trials} trials finished; rerun the same command to "
              "continue the study", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0


def run_workers(args: argparse.Namespace, parent: str, lock_fd: int) -> None:
    """--workers N: N processes on the study's journal, each holding the study's lock (study_lock);
    Ctrl-C or SIGTERM stops them all."""
    cmd = [sys.executable, "-m", "cifarpipe.commands.tune", str(args.space), "--params", str(args.params),
           "--workers", str(args.workers), "--worker-of", parent]
    procs = [subprocess.Popen(cmd + ["--worker-index", str(i)], pass_fds=(lock_fd,)) for i in range(args.workers)]
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(codes):
        print(f"worker exit statuses: {codes}", file=sys.stderr)
        if INTERRUPTED_EXIT in codes:
            raise KeyboardInterrupt


def work(spec: tuning.TuneSpec, name: str, journal: Path, parent: str, base: Params, index: int,
         workers: int) -> int:
    """One worker: trials until the study has spec.trials finished ones."""
    import optuna
    import torch

    from cifarpipe.pipeline.trial import load_trial_data
    from cifarpipe.tracking import store
    from cifarpipe.training import engine

    client = store.connect()
    study = open_study(spec, name, journal, worker_index=index)
    device = engine.pick_device(base.train.device)
    if workers > 1 and device.type == "cpu":
        # the cores shared out: 2 workers on 2 cores would otherwise run 4 threads on 2 cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    data = load_trial_data(base)
    prefix = f"[worker {index}] " if workers > 1 else ""
    objective = Objective(spec, name, base, parent, client, data, device, prefix)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while finished(study) < spec.trials:
            study.optimize(objective, n_trials=1, catch=(UserError, ValueError))
            if objective.failures >= MAX_FAILURES_IN_A_ROW:
                raise UserError(f"{objective.failures} trials in a row failed (last: {objective.last_error}); "
                                "stopping this worker")
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", flush=True)
        return INTERRUPTED_EXIT
    return 0


class Objective:
    """One trial: its params, its nested MLflow run, its training with a report after every epoch."""

    def __init__(self, spec: tuning.TuneSpec, name: str, base: Params, parent: str, client, data, device,
                 prefix: str) -> None:
        self.spec, self.name, self.base, self.parent, self.client = spec, name, base, parent, client
        self.data, self.device, self.prefix = data, device, prefix
        self.failures, self.last_error = 0, ""

    def __call__(self, trial) -> float:
        import optuna

        try:
            value = self._run(trial)
        except optuna.TrialPruned:
            self.failures = 0
            raise
        except Exception as e:
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            trial.set_user_attr("error", self.last_error)
            print(f"{self.prefix}trial {trial.number} failed: {self.last_error}", flush=True)
            raise
        self.failures = 0
        return value

    def _run(self, trial) -> float:
        import optuna

        from cifarpipe.pipeline.trial import train_trial
        from cifarpipe.tracking import study as runs

        searched = tuning.suggest(trial, self.spec)
        params = tuning.with_values(self.base, tuning.trial_values(self.spec, searched), f"trial {trial.number}")
        run_id = runs.start_trial(self.client, self.parent, self.name, trial.number, flatten(params), searched)
        trial.set_user_attr("mlflow_run_id", run_id)
        print(f"{self.prefix}trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                  for k, v in searched.items()), flush=True)

        def on_epoch(row: dict[str, float]) -> bool:
            runs.log_epoch(self.client, run_id, row)
            epoch = int(row["epoch"])
            print(f"{self.prefix}trial {trial.number} epoch {epoch}/{params.train.epochs}: val acc "
                  f"{row['val_accuracy']:.4f}, {row['epoch_seconds']:.1f} s", flush=True)
            trial.report(row["val_accuracy"], epoch)
            return trial.should_prune()

        try:
            state = train_trial(params, self.data, self.device, on_epoch)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            runs.end_trial(self.client, run_id, "INTERRUPTED")
            raise
        except BaseException as e:
            runs.end_trial(self.client, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"[:500]})
            raise
        curve = [row["val_accuracy"] for row in state.history]
        trial.set_user_attr("val_accuracy_per_epoch", curve)
        if len(curve) < params.train.epochs and not state.stopped_early:
            runs.end_trial(self.client, run_id, "PRUNED", {"pruned_after_epoch": str(len(curve))})
            print(f"{self.prefix}trial {trial.number} pruned after epoch {len(curve)}", flush=True)
            raise optuna.TrialPruned()
        value = tuning.trial_value(curve, params.evaluate.weights)
        stopped = {"stopped_early_after_epoch": str(len(curve))} if state.stopped_early else {}
        if stopped:
            print(f"{self.prefix}trial {trial.number}: train.early_stopping ended it after epoch {len(curve)}",
                  flush=True)
        runs.end_trial(self.client, run_id, "COMPLETE", stopped)
        runs.trial_done(self.client, self.parent, trial.number, value)
        return value


# ---------------------------------------------------------------- the study's result
def summarise(study, spec: tuning.TuneSpec, name: str, base: Params, params_path: Path, recipe: Path,
              parent: str) -> Path | None:
    """Print every trial; write the best complete trial as `recipe`. Returns the recipe, or None."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for t in trials:
        curve = " ".join(f"{v:.4f}" for v in t.user_attrs.get("val_accuracy_per_epoch", []))
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        print(f"  trial {t.number:3d}  {t.state.name:8s}  val acc per epoch [{curve}]  {values}")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("no trial is complete yet: no recipe written")
        return None
    best = study.best_trial
    params = tuning.with_values(base, tuning.trial_values(spec, best.params), f"trial {best.number}")
    own = tuning.own_params(params_path)
    values = tuning.recipe_values(own, params, spec)
    tuning.check_recipe(values, own)
    curve = ", ".join(f"{v:.4f}" for v in best.user_attrs["val_accuracy_per_epoch"])
    header = [f"the best of {len(trials)} trials: trial {best.number}, validation accuracy per epoch {curve}",
              f"MLflow: trial run {best.user_attrs['mlflow_run_id']}, study run {parent}",
              f"reproduce: dvc exp run -S recipe={recipe.stem}   (keys not listed: params.yaml's values)"]
    atomic.write_text(recipe, tuning.recipe_text(name, header, values))
    print(f"best: trial {best.number}, validation accuracy {best.value:.4f} (evaluate.weights "
          f"{params.evaluate.weights}, {len(best.user_attrs['val_accuracy_per_epoch'])} epochs trained); recipe "
          f"{recipe} ({len(values)} values): dvc exp run -S recipe={recipe.stem}")
    return recipe


def summary_metrics(study) -> dict[str, float]:
    from optuna.trial import TrialState

    out = {f"trials_{state.name.lower()}": len(study.get_trials(deepcopy=False, states=(state,)))
           for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if out["trials_complete"]:
        out.update(best_val_accuracy=study.best_value, best_trial=study.best_trial.number)
    return out


def summary_tags(study) -> dict[str, str]:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return {}
    best = study.best_trial
    return {"best_trial_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "best_params": ", ".join(f"{k}={v}" for k, v in best.params.items())[:5000]}


def cli() -> None:
    """The console entry point: a UserError prints one line and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
