"""The training job's MLflow run: opened (new, continued or resumed), fed once per epoch, closed.

One run per training job. A job resumed from its checkpoint continues the checkpoint's run; a job
killed before its first checkpoint continues the run it had created (found by the workspace and
fingerprint tags); `mlflow run .` hands its own run over (MLFLOW_RUN_ID). Runs this workspace left
RUNNING that nobody continues are marked KILLED. The train stage's MLflow process
(tracking.job_process) makes the calls: open_job_run before the first epoch, JobRun.epoch_done
after each, and JobRun.close after the outputs are written (JobRun.stop for a run left unfinished).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from cifarpipe import atomic
from cifarpipe.config import Params, UserError, flatten
from cifarpipe.tracking import card, checkpoints, datasets, in_force, model, provenance, record, tensorboard
from cifarpipe.tracking.delivery import abandon, deliver
from cifarpipe.tracking.job_process import JobStart
from cifarpipe.tracking.journal import Journal
from cifarpipe.tracking.run import EPOCH_METRICS, RunLogger
from cifarpipe.tracking.store import create_experiment, is_not_found, short_error, tracking_uri, uri_of
from cifarpipe.tracking.system_metrics import SystemMetrics


@dataclass
class JobRun:
    """The job's open run: `logger` sends metrics and artifacts; `tb_dir` is its TensorBoard folder
    (None: off); `already_logged` the epochs each metric already has in the run."""
    logger: RunLogger
    tb_dir: Path | None
    already_logged: dict[str, set[int]]
    reuses: str | None = None  # a new run recording a finished job's reuse: the run that trained it

    @property
    def run_id(self) -> str:
        return self.logger.run_id

    def epoch_done(self, history: list[dict[str, float]], checkpoint: Path) -> None:
        """After an epoch's checkpoint: its metrics (history[-1]) and its checkpoint model with the
        file, sent in the background; the TensorBoard file rewritten from the whole history (a
        resumed job never writes an epoch twice)."""
        if self.tb_dir:
            tensorboard.write_tensorboard(self.tb_dir, history)
        self.logger.checkpoints.add_epoch(history, checkpoint)
        self.logger.queue_history(history[-1:], skip=self.already_logged)

    def stop(self, status: str, attempts: int = 3) -> None:
        """End an unfinished job's run (KILLED after a stop request, FAILED after an error)."""
        self.logger.drain(attempts=attempts)
        waiting = self.logger.checkpoints.discard()
        if waiting:
            print(f"note: MLflow did not take the checkpoint file of epoch(s) {', '.join(map(str, waiting))} "
                  f"(run {self.run_id}); it stays on disk, and when this job finishes (`dvc repro`) its best and "
                  "last epochs' files are uploaded", file=sys.stderr)
        self.logger.finish(status)

    def close(self, *, best: Path, last: Path, history: list[dict[str, float]], history_file: Path,
              weights: Path, weights_epoch: int, classes: list[str], example: np.ndarray, registered_model: str,
              metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> str:
        """Deliver a finished training's record: queued metrics and checkpoint models, the files
        `best` and `last` (the job's best.pt and last.pt) into their epochs' models (every other
        model's file removed), the history as an artifact, `metrics` (step 0: the stage's
        phase timings), `tags` (which weights, where training stopped), the model (logged from the
        weights file, linked at `weights_epoch`: the epoch of those weights; `classes` for its
        card), then status FINISHED,
        last; register the model as a version of `registered_model` ("" = off).

        Everything goes through the journal: what the store does not take stays there and is
        delivered by evaluate or the next `dvc repro`; the stage still succeeds, since its outputs
        are complete and DVC must record them. Safe to call again for the same run (to finish a run
        whose process was killed after the final checkpoint): the model is logged once, artifacts
        overwrite, metrics already in the run are skipped. Returns the model's URI, or a note that
        it is pending.
        """
        journal, logger = self.logger.journal, self.logger
        logger.drain()  # queued per-epoch metrics and checkpoint models: sent, or journaled
        logger.checkpoints.discard()  # files still waiting: best.pt and last.pt stand in for them
        checkpoint_files = checkpoints.final_files(history, best, last)
        files = {epoch: path for epoch, path in checkpoint_files.items() if path.exists()}
        journal.add_checkpoint_files(self.run_id, files, keep=set(checkpoint_files))
        journal.add_artifact(self.run_id, history_file)
        if self.tb_dir:  # the TensorBoard event file: a `--logdir` once downloaded
            tensorboard.write_tensorboard(self.tb_dir, history)
            journal.add_artifact(self.run_id, self.tb_dir / tensorboard.TENSORBOARD_FILE, f"tensorboard/{self.tb_dir.name}")
        if metrics:
            journal.add_metrics(self.run_id, metrics)
        if tags:
            journal.add_tags(self.run_id, tags)
        journal.add_model(self.run_id, weights, example, step=weights_epoch)
        logger.finish("FINISHED")  # journals the status after the rest and delivers this run's items
        left = [it for it in journal.items if it["run_id"] == self.run_id]
        if left:
            print(f"warning: training finished and its outputs are written, but MLflow store "
                  f"{uri_of(logger.client)} did not take {len(left)} item(s) of run {self.run_id} "
                  f"({journal.errors.get(self.run_id, '')}); they are kept in {journal.path} and delivered by "
                  "the evaluate stage or the next `dvc repro`", file=sys.stderr)
            return f"pending in {journal.path}"
        try:
            uri = model.logged_model_uri(logger.client, self.run_id) or "not logged"
        except Exception:  # delivered a moment ago; only this look-up failed
            uri = f"runs:/{self.run_id}/model"
        if uri.startswith(("models:/", "runs:/")):  # the card from the record; the version, its alias
            card.publish(logger.client, self.run_id, uri, registered_model, classes)
        return uri


def open_job_run(client: MlflowClient, params: Params, start: JobStart, journal: Journal, run_id_file: Path,
                 tensorboard_root: Path) -> JobRun:
    """Open the job's run (the checkpoint's, a run killed before its first checkpoint, the one
    `mlflow run .` created, or a new one), write its id to `run_id_file`, and record how it
    started: params, tags, requirements, the record, datasets, system metrics."""
    project_run = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run .` created for this job
    workspace = provenance.workspace_tags()
    reuses, record_run = finished_run_to_reuse(client, params, start, project_run)
    if reuses:  # a run of its own records this execution (an earlier one's for the same context, else a new
        # one); the finished run stays as it is
        start = dataclasses.replace(start, resume_run_id=record_run, resumed=record_run is not None)
    run_id = _tidy_orphans(client, params.tracking.experiment, workspace["workspace_key"], start, project_run, journal)
    git = provenance.read_git_state()
    rec = record.run_record(params, git)  # run name, DVC experiment, source/user tags, how to reproduce
    if reuses:
        rec = reuse_record(rec, reuses, start)
    logger = open_run(client, params.tracking.experiment, run_id, journal=journal,
                       create_tags={**workspace, "fingerprint": start.fingerprint}, run_name=rec.name)
    if run_id and logger.run_id != run_id:  # e.g. `mlflow run .` continues a killed job
        mark_abandoned(client, run_id, f"continued in run {logger.run_id}", journal)
    atomic.write_text(run_id_file, logger.run_id + "\n")
    continued = start.resumed and logger.run_id == run_id
    inputs = [datasets.dataset_input(part, params.data.url, params.data.md5, n, start.split_hash)
              for part, n in (("training", start.n_train), ("validation", start.n_val))]
    # Every epoch of the checkpoint gets its checkpoint model (found, or made if a killed process
    # never sent it); the epochs' metrics carry the model's id and their dataset's name and digest.
    logger.checkpoints = checkpoints.CheckpointLog(
        client, logger.run_id, {i.tags[0].value: [i.dataset.name, i.dataset.digest] for i in inputs},
        start.job_dir / checkpoints.SNAPSHOT_DIR if start.job_dir else None,
        epochs=[int(row["epoch"]) for row in start.history])
    already_logged: dict[str, set[int]] = {}
    try:
        if continued:
            already_logged = logger.logged_steps()
            logger.queue_history(start.history, skip=already_logged)  # fill what the killed process never sent
        else:
            tags = {**git.tags(), **start.environment, **workspace,
                    "data_md5": params.data.md5, "split_hash": start.split_hash, "fingerprint": start.fingerprint,
                    "deterministic": str(params.train.deterministic).lower()}
            if reuses:
                tags.update({"reuses_run": reuses, "reuses_checkpoint": str(start.checkpoint)})
            logger.log_start(flatten(params), tags, provenance.requirements_text())
            record.log_record(client, logger.run_id, rec)
            logger.queue_history(start.history)  # a resumed or reused job in a new run: all its epochs
        # A run that existed before (continued, adopted, or `mlflow run`'s): its params may be stale.
        in_force.record_params_in_force(client, logger.run_id, flatten(params))
    except Exception as e:  # the run stays RUNNING: the next attempt continues it (checkpoint or orphan scan)
        raise UserError(f"the MLflow store {tracking_uri()} failed while run {logger.run_id} was being set up "
                        f"({type(e).__name__}); nothing was trained: run again when it answers, the same run "
                        "continues") from None
    datasets.log_datasets(client, logger.run_id, inputs)
    if params.tracking.system_metrics:
        logger.system_metrics = SystemMetrics.start(client, logger.run_id, resume=continued)
    tb_dir = (tensorboard.tensorboard_dir(tensorboard_root, client, logger.run_id)
              if params.tracking.tensorboard else None)
    return JobRun(logger, tb_dir, already_logged, reuses)


def finished_run_to_reuse(client: MlflowClient, params: Params, start: JobStart, project_run: str | None
                          ) -> tuple[str | None, str | None]:
    """(the run of a finished job whose weights this execution reuses, the run that records this
    execution if one exists already) when this execution needs a run of its own; (None, None) to
    continue the checkpoint's run as before.

    A complete checkpoint means no training: the outputs are written again from it. Its run is the
    record of this execution only when it is the same one: same DVC experiment (or none), same params
    in force. A new DVC experiment (`dvc exp run -S train.nproc_per_node=2`), or any param outside the
    fingerprint changed, gets a new run: named after it, with its own params, tagged reuses_run. A
    run that is not FINISHED was killed while closing: it is completed, as before. A run the store
    no longer has (or has deleted) gets a new run too."""
    if not (start.complete and start.resume_run_id) or project_run:
        return None, None
    trained_by = start.resume_run_id
    try:
        run = client.get_run(trained_by)
        if run.info.lifecycle_stage == "active" and run.info.status != "FINISHED":
            return None, None
        if run.info.lifecycle_stage == "active" and _same_context(run, params):
            return None, None
        # A run that recorded this same execution before (`dvc exp run -f` of the experiment): continued.
        earlier = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"],
                                     filter_string=f"tags.reuses_run = '{trained_by}' and attributes.status = 'FINISHED'")
        return trained_by, next((r.info.run_id for r in earlier if _same_context(r, params)), None)
    except Exception as e:
        if is_not_found(e):
            return trained_by, None
        raise UserError(f"the MLflow store {tracking_uri()} did not answer for run {trained_by} "
                        f"({short_error(e)}); nothing was changed: run again when it answers") from None


def _same_context(run, params: Params) -> bool:
    """Whether `run` records an execution like this one: the same DVC experiment (or none) and the same params in force."""
    experiment, _ = record.dvc_experiment()
    current = {k: str(v) for k, v in flatten(params).items()}
    return (experiment == run.data.tags.get("dvc_experiment")
            and not in_force.differing(in_force.params_in_force(run.data.params, run.data.tags), current))


def reuse_record(rec: record.RunRecord, reuses: str, start: JobStart) -> record.RunRecord:
    """The run record of an execution that trains nothing: its description says whose weights it has."""
    note = (f"**No training ran in this run.** Its weights, history and checkpoints are those of run `{reuses}` "
            f"(checkpoint `{start.checkpoint}`), which trained the same job (fingerprint `{start.fingerprint}`: "
            "the same params that shape training, data and code) to the end; this run records this execution's "
            f"params. To train again, move `{start.checkpoint.parent if start.checkpoint else 'the checkpoint folder'}`"
            " away and rerun.\n\n")
    return record.RunRecord(rec.name, {**rec.tags, MLFLOW_RUN_NOTE: note + rec.tags.get(MLFLOW_RUN_NOTE, "")})


def _tidy_orphans(client: MlflowClient, experiment: str, workspace_key: str, start: JobStart,
                  project_run: str | None, journal: Journal) -> str | None:
    """The run to continue: the checkpoint's, or a run of this job killed before its first
    checkpoint (it logged no epoch yet, and training from the seed redoes exactly its work). Any
    other run this workspace left RUNNING is marked KILLED; it resumes from its checkpoint folder
    if its params come back."""
    run_id = start.resume_run_id
    try:
        orphans = running_runs(client, experiment, workspace_key)
        unstarted = {o.info.run_id for o in orphans
                     if run_id is None and not start.resumed and o.data.tags.get("fingerprint") == start.fingerprint
                     and not has_epoch_metrics(client, o.info.run_id)}
    except Exception as e:
        raise UserError(f"the MLflow store {tracking_uri()} did not answer a search ({type(e).__name__}); "
                        "nothing was trained and no run was changed: run again when it answers") from None
    for orphan in orphans:
        orphan_id = orphan.info.run_id
        if orphan_id in (run_id, project_run):
            continue
        if run_id is None and orphan_id in unstarted:
            run_id = orphan_id
            print(f"continuing MLflow run {run_id}: its training was killed before the first checkpoint")
        else:
            mark_abandoned(client, orphan_id, "interrupted; another training ran in its workspace "
                                              "(it resumes from its checkpoint if its params return)", journal)
    return run_id


def open_run(client: MlflowClient, experiment: str, resume_run_id: str | None, journal: Journal | None = None,
              create_tags: dict[str, str] | None = None, run_name: str | None = None, log=print) -> RunLogger:
    """Adopt MLFLOW_RUN_ID (the run `mlflow run .` created: it must not stay empty); else resume
    `resume_run_id` if the store still has it; else create a new run in `experiment`, tagged
    with `create_tags` in the same call (no moment exists where the run lacks them).

    Only the store's definite "no such run" starts a new run. Any other error (a 5xx, a timeout)
    stops here with a UserError, before anything is trained or changed: continuing in a new run
    would split the job and mark the real run KILLED. First, whatever `journal` holds from earlier
    jobs is delivered (best effort: what fails stays in the journal).
    """
    uri = uri_of(client)
    if journal is not None and journal.items:
        deliver(client, journal, log=log)
    try:
        for run_id, why in ((os.environ.get("MLFLOW_RUN_ID"), "mlflow run"), (resume_run_id, "resuming")):
            if not run_id:
                continue
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if not is_not_found(e):
                    raise
                log(f"MLflow run {run_id} ({why}) is not in {uri}; starting a new run")
                continue
            if run.info.lifecycle_stage != "active":
                log(f"MLflow run {run_id} ({why}) was deleted; starting a new run")
                continue
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            if journal is not None:  # a journaled KILLED/FAILED or abandon of an earlier attempt is obsolete now
                journal.remove(lambda it: it["run_id"] == run_id and it["kind"] in ("status", "abandon"))
            return RunLogger(client, run_id, journal)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else create_experiment(client, experiment)
        run = client.create_run(exp_id, tags=create_tags or {}, run_name=run_name)
    except Exception as e:
        raise UserError(f"the MLflow store {uri} did not answer as expected ({short_error(e)}). Nothing was "
                        "trained and no run was changed; run again when the store answers.") from None
    return RunLogger(client, run.info.run_id, journal)


def running_runs(client: MlflowClient, experiment: str, workspace_key: str) -> list:
    """Runs of `experiment` created in this workspace that are still RUNNING, newest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.status = 'RUNNING' and tags.workspace_key = '{workspace_key}'")


def has_epoch_metrics(client: MlflowClient, run_id: str) -> bool:
    return any(k in EPOCH_METRICS for k in client.get_run(run_id).data.metrics)


def mark_abandoned(client: MlflowClient, run_id: str, why: str, journal: Journal | None = None) -> None:
    """A killed job's run that will not be continued: KILLED instead of RUNNING forever.

    A store that does not answer must neither stop the job (this is bookkeeping of a run nobody
    continues; the training to come does not depend on it) nor pass for "the run is gone": the
    tidy-up is journaled in `journal` and done by the next delivery, with a warning now.
    """
    try:
        abandon(client, run_id, why)
    except Exception as e:
        if is_not_found(e):
            return  # the run is gone from this store: nothing to tidy
        print(f"warning: could not mark MLflow run {run_id} KILLED ({short_error(e)})"
              + (f"; kept in {journal.path} and done when the store answers" if journal else ""), file=sys.stderr)
        if journal is not None:
            journal.add({"run_id": run_id, "kind": "abandon", "why": why})
