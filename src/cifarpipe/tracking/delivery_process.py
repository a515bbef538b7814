"""The evaluate stage's MLflow delivery, in a process of its own started when the stage starts.

`import mlflow`, the delivery code and opening the SQLite store are 2-3 s of Python import work
on a 2-core CPU. Import work holds the GIL, so in a thread of the stage it ran no faster than
before the stage's own work (measured: the same wall time). In a second process it runs on the
other core while the stage imports torch, loads the test images and evaluates the model; the
stage then sends one request and reads one answer.

Protocol: one JSON line each way, the request on the child's stdin ({"journal": path,
"run_id": id}), the answer (`Answer`) on a pipe of its own; the child's stdout and stderr are the
stage's, so what delivery and MLflow print shows as before. The child looks up the store, checks
it and the run, and delivers the journal (tracking.delivery); the stage turns the facts it
returns into messages and an exit status. The child never outlives the stage: on Linux the kernel
kills it when the stage dies (PR_SET_PDEATHSIG), also in the middle of a delivery (each step is
idempotent, the journal rewritten atomically: what is left stays pending for the rerun, which
would otherwise deliver the same journal at the same time); elsewhere a stage that dies before
its request closes the pipe, and the child reads end-of-file and exits without delivering.

This module imports no MLflow at its top: the stage imports it for `DeliveryProcess`.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cifarpipe
from cifarpipe import faults


@dataclass
class Answer:
    """What the delivery process found and did."""
    uri: str  # the store, as the stage reports it
    ready_seconds: float  # the child's imports (MLflow, the delivery code) and the store's client
    missing_store: str | None = None  # a SQLite store file that isn't there: nothing was delivered
    deleted: bool = False  # the run is in the store's bin: nothing was delivered
    left: int = 0  # items the store did not take (still in the journal)
    error: str = ""  # the first store error, when items are left
    dropped: str | None = None  # why the store refused this evaluation for good (None: it did not)
    delivered_to: str = ""  # the run that holds the evaluation: the training run or its nested one
    versions: list[int] = field(default_factory=list)  # model versions tagged with test_accuracy


class DeliveryFailed(RuntimeError):
    """The child ended without an answer: `killed` by a signal (nothing wrong with the setup: a rerun
    delivers), or failed with an error of its own, printed on the stage's stderr."""

    def __init__(self, status: int) -> None:
        self.killed = status < 0
        how = f"was killed by signal {-status}" if self.killed else f"failed with exit status {status} (its error is above)"
        super().__init__(f"the MLflow delivery process {how} before answering")


class DeliveryProcess:
    """The stage's side: start it first thing; `deliver` once the journal holds the evaluation.
    The answer comes back over a pipe of its own, so the child's stdout stays the stage's."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # the child imports this checkout's cifarpipe, the one the stage runs (an installed copy could differ)
        package_root = str(Path(cifarpipe.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(write_end), str(os.getpid())],
                                         stdin=subprocess.PIPE,
                                         env=env, text=True, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.answers = os.fdopen(read_end)

    def deliver(self, journal: Path, run_id: str) -> Answer:
        sys.stdout.flush()  # what the stage printed comes before what the child prints
        try:
            self.proc.stdin.write(json.dumps({"journal": str(journal), "run_id": run_id}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it has exited already: its status is reported below
        line = self.answers.readline()
        status = self.proc.wait()
        if not line:
            raise DeliveryFailed(status)
        return Answer(**json.loads(line))

    def close(self) -> None:
        """End the child if it is still waiting (the stage failed before its delivery)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.answers.close()

    def __enter__(self) -> DeliveryProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(stage_pid: int) -> None:
    """SIGKILL this process when the stage that started it dies (Linux), and exit now if it is gone already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != stage_pid:  # it died before the line above took effect
        os._exit(0)


def serve(answer_fd: int) -> int:
    """The child: import MLflow and make the store's client, then answer one request."""
    t0 = time.perf_counter()
    from cifarpipe.tracking import delivery, store
    from cifarpipe.tracking.journal import Journal

    uri = store.tracking_uri()
    client = None if store.missing_store_file(uri) else store.store_client()  # never creates a store file
    answer = Answer(uri, round(time.perf_counter() - t0, 3))
    line = sys.stdin.readline()
    if not line:  # the stage ended without asking
        return 0
    request = json.loads(line)
    run_id = request["run_id"]
    if db := store.missing_store_file(uri):
        answer.missing_store = str(db)
    elif delivery.is_deleted(client := client or store.store_client(), run_id):
        answer.deleted = True
    else:
        faults.hit("delivery", 0)  # the tests' SIGKILL of this process, with the evaluation journaled
        journal = Journal(Path(request["journal"]))
        item = next(it for it in reversed(journal.items) if it["run_id"] == run_id and it["kind"] == "evaluation")
        answer.left = delivery.deliver(client, journal, log=lambda msg: None)
        answer.error = next(iter(journal.errors.values()), "")
        answer.dropped = next((why for it, why in journal.dropped if it is item), None)
        answer.delivered_to = item.get("delivered_to", run_id)
        answer.versions = item.get("versions") or []
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(asdict(answer)) + "\n")
    return 0


if __name__ == "__main__":
    die_with(int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage's to handle: it ends this process
    code = serve(int(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown of MLflow's modules (1-3 s, see pipeline.stage.run_stage)
