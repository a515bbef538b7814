"""The evaluate stage's MLflow delivery, in a process of its own started when the stage starts
(tracking.child: why a process, and how it dies with the stage).

Protocol: one JSON line each way, the request on the child's stdin ({"journal": path,
"run_id": id}), the answer (`Answer`) on a pipe of its own. The child looks up the store, checks
it and the run, and delivers the journal (tracking.delivery); the stage turns the facts it
returns into messages and an exit status. A stage killed in the middle of a delivery takes the
child with it: each step is idempotent and the journal rewritten atomically, so what is left stays
pending for the rerun (which would otherwise deliver the same journal at the same time).

This module imports no MLflow at its top: the stage imports it for `DeliveryProcess`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cifarpipe import faults
from cifarpipe.tracking import child


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
        super().__init__(f"the MLflow delivery process {child.how_it_ended(status)} before answering")


class DeliveryProcess:
    """The stage's side: start it first thing; `deliver` once the journal holds the evaluation.
    The answer comes back over a pipe of its own, so the child's stdout stays the stage's."""

    def __init__(self) -> None:
        read_end, write_end = os.pipe()
        try:
            self.proc = child.start(__name__, (write_end,), stdin=subprocess.PIPE, text=True)
        except BaseException:
            os.close(read_end)
            raise
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
    child.become_child(int(sys.argv[2]))
    child.exit_now(serve(int(sys.argv[1])))
