"""The train stage's MLflow run, kept by a process of its own (tracking.child: why a process).

The stage script starts `JobProcess` before it imports torch. The child imports MLflow and our
tracking code and checks that the store answers while the stage imports torch and loads the
data; then it does the job's MLflow work (tracking.job) on the stage's requests:

    ready()              the store answers (else the UserError that says it does not)
    open(...)            open the job's run: a `RemoteRun` with its id
    run.epoch_done(...)  an epoch's metrics and checkpoint model (no answer: training goes on)
    run.stop(status)     end an unfinished job's run (KILLED, FAILED)
    run.close(...)       deliver the finished job's record and model; returns the model's URI

So the stage process imports neither MLflow nor pandas (1.2 s of imports on a 2-core CPU), opens
no SQLite store (0.9 s), and its epochs share no GIL with the per-epoch logging.

Requests and answers are pickled (multiprocessing.connection) on two pipes; an answer is ("ok",
value), ("user_error", message) or ("error", message), the traceback printed by the child. A child
that is gone raises `MlflowProcessLost` in the stage at its next request: the checkpoints written
so far are the record, and the next `dvc repro` resumes into the same run (tracking.job).

This module imports no MLflow at its top.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cifarpipe import faults
from cifarpipe.config import Params, UserError
from cifarpipe.tracking import child


@dataclass
class JobStart:
    """What the train stage knows about its job when it opens the run."""
    fingerprint: str  # the job's checkpoint folder name: params, data and code
    split_hash: str
    environment: dict[str, str]  # provenance.environment_tags, made by the stage: it has torch loaded, this process not
    resumed: bool  # from a checkpoint of this job
    resume_run_id: str | None  # the checkpoint's run
    history: list[dict[str, float]] = field(default_factory=list)  # the checkpoint's epochs
    n_train: int = 0
    n_val: int = 0
    complete: bool = False  # the checkpoint is of a finished training (all epochs or stopped early; outputs written)
    checkpoint: Path | None = None  # the checkpoint file it resumes from
    job_dir: Path | None = None  # the job's checkpoint folder (where files wait for their upload)


@dataclass(frozen=True)
class Ready:
    uri: str  # the store, as the stage reports it
    seconds: float  # the child's imports (MLflow, tracking code) and the store's check


class MlflowProcessLost(RuntimeError):
    """The job's MLflow process ended before the stage was done with it: killed by a signal, or
    failed with an error of its own (printed above)."""

    def __init__(self, status: int | None) -> None:
        self.status = status
        how = child.how_it_ended(status) if status is not None else "stopped answering"
        super().__init__(f"the MLflow process of this training {how}")


class JobProcess:
    """The stage's side: start it first thing; `ready`, then `open` once the job is known."""

    def __init__(self) -> None:
        requests_read, requests_write = os.pipe()
        answers_read, answers_write = os.pipe()
        try:
            self.proc = child.start(__name__, (requests_read, answers_write))
        except BaseException:
            os.close(requests_write)
            os.close(answers_read)
            raise
        self._requests = Connection(requests_write, readable=False)
        self._answers = Connection(answers_read, writable=False)

    def send(self, name: str, *args: Any) -> None:
        sys.stdout.flush()  # what the stage printed comes before what the child prints
        try:
            self._requests.send((name, args))
        except OSError:  # BrokenPipeError: it has exited
            raise MlflowProcessLost(self._ended()) from None

    def answer(self) -> Any:
        try:
            kind, value = self._answers.recv()
        except (EOFError, OSError):
            raise MlflowProcessLost(self._ended()) from None
        if kind == "user_error":
            raise UserError(value)
        if kind == "error":
            raise RuntimeError(f"the MLflow process of this training failed: {value} (its traceback is above)")
        return value

    def call(self, name: str, *args: Any) -> Any:
        self.send(name, *args)
        return self.answer()

    def _ended(self) -> int | None:
        try:
            return self.proc.wait(timeout=10)
        except Exception:
            return None

    def ready(self) -> Ready:
        """The child's first answer: the store answers (else its UserError, raised here)."""
        return self.answer()

    def open(self, params: Params, start: JobStart, journal: Path, run_id_file: Path,
             tensorboard_root: Path) -> RemoteRun:
        """tracking.job.open_job_run in the child: the job's run, opened and recorded."""
        run_id, reuses = self.call("open", params, start, journal, run_id_file, tensorboard_root)
        return RemoteRun(self, run_id, reuses)

    def close(self) -> None:
        """End the child if it is still running (the stage ends, or failed before the run was done)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._requests.close()
        self._answers.close()

    def __enter__(self) -> JobProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RemoteRun:
    """The job's open run, held by the child: the calls of tracking.job.JobRun."""
    process: JobProcess
    run_id: str
    reuses: str | None  # a new run recording a finished job's reuse: the run that trained it

    def epoch_done(self, history: list[dict[str, float]], checkpoint: Path) -> None:
        """After an epoch's checkpoint: its metrics and checkpoint model, sent by the child while
        training goes on."""
        self.process.send("epoch_done", history, checkpoint)

    def stop(self, status: str, attempts: int = 3) -> None:
        """End an unfinished job's run (KILLED after a stop request, FAILED after an error)."""
        self.process.call("stop", status, attempts)

    def close(self, **record: Any) -> str:
        """tracking.job.JobRun.close in the child; the model's URI, or where it is pending."""
        return self.process.call("close", record)


def serve(requests: Connection, answers: Connection) -> int:
    """The child: import MLflow, check the store, then do the stage's requests until the run ends
    (stop, close) or the stage closes the pipe."""
    t0 = time.perf_counter()
    from cifarpipe.tracking import job, provenance, store
    from cifarpipe.tracking.journal import Journal

    try:
        client = store.connect()
    except UserError as e:
        answers.send(("user_error", str(e)))
        return 0
    answers.send(("ok", Ready(store.tracking_uri(), round(time.perf_counter() - t0, 3))))
    provenance.requirements_text()  # read now (0.3 s), while the stage still loads its data; open uses it
    run: job.JobRun | None = None
    failed = ""  # an epoch's logging that failed (it has no answer to carry it): close reports it
    while True:
        try:
            name, args = requests.recv()
        except EOFError:  # the stage ended without closing the run: the next attempt continues it
            return 0
        try:
            if failed and name == "close":  # a record with a hole is no finished run; stop still ends it
                raise RuntimeError(failed)
            if name == "open":
                params, start, journal, run_id_file, tensorboard_root = args
                run = job.open_job_run(client, params, start, Journal(journal), run_id_file, tensorboard_root)
                value: Any = (run.run_id, run.reuses)
            elif name == "epoch_done":
                faults.hit("mlflow_process", int(args[0][-1]["epoch"]))  # the tests' SIGKILL of this process
                run.epoch_done(*args)
                continue
            elif name == "stop":
                value = run.stop(*args)
            elif name == "close":
                value = run.close(**args[0])
            else:
                raise ValueError(f"unknown request {name!r}")
            reply = ("ok", value)
        except UserError as e:
            reply = ("user_error", str(e))
        except Exception as e:
            traceback.print_exc()
            failed = failed or f"{type(e).__name__}: {e}"
            if name == "epoch_done":
                continue
            reply = ("error", failed)
        sys.stdout.flush()
        sys.stderr.flush()
        answers.send(reply)
        if name in ("stop", "close") and reply[0] == "ok":
            return 0  # the run is ended


if __name__ == "__main__":
    child.become_child(int(sys.argv[3]))
    # by its module name: what it pickles (Ready) must unpickle in the stage, where it is not __main__'s
    from cifarpipe.tracking import job_process

    child.exit_now(job_process.serve(Connection(int(sys.argv[1]), writable=False),
                                     Connection(int(sys.argv[2]), readable=False)))
