"""Free the disk that finished trainings no longer need: checkpoint folders and MLflow checkpoint files.

    cifarpipe-gc              # a dry run: what would go, what stays and why, sizes
    cifarpipe-gc --delete     # remove it; then the printed `mlflow gc` and `dvc gc` commands finish the job

A job's folder, outputs/checkpoints/<fingerprint>/, goes only when all of these hold (see
docs/10-tools.md):
  1. no process holds it (a training of the job right now holds job.lock);
  2. its last.pt loads and says the job is complete (an unfinished job resumes from it; a folder
     with no readable last.pt is never touched);
  3. the job's MLflow run is not RUNNING (a RUNNING run with a complete checkpoint is a training
     being completed: the next `dvc repro` finishes it from the folder);
  4. no git commit or DVC experiment needs it: one whose outputs/run_id.txt names the job's run
     (or a run that reuses its weights: tag reuses_run) and whose trained model (dvc.lock's
     outputs/model.pt) is not in the DVC cache, so that `dvc repro` there would have to rebuild
     the outputs from the checkpoint, or retrain.
Then last.pt, best.pt and job.lock are removed, and the folder if nothing else is in it (a
checkpoint set aside as unreadable, or any file of yours, stays). In the MLflow store the
`checkpoints/last.pt` artifact of every FINISHED run goes (tracking.cleanup); the model and
`checkpoints/best.pt` stay.
"""
from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cifarpipe.config import UserError
from cifarpipe.training import checkpoint

OWN_FILES = ("last.pt", "best.pt", checkpoint.LOCK_NAME)  # what gc removes from a finished job's folder


@dataclass
class Folder:
    path: Path
    size: int
    run_id: str | None = None
    complete: bool = False
    where: str = ""  # how far an unfinished job got
    in_use: bool = False
    keep: bool = True
    reason: str = ""


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def scan(checkpoint_dir: Path) -> list[Folder]:
    """Every job folder with what its last.pt says; nothing is changed."""
    folders = []
    for path in sorted(p for p in checkpoint_dir.glob("*") if p.is_dir()) if checkpoint_dir.is_dir() else []:
        folder = Folder(path, tree_size(path), in_use=checkpoint.is_claimed(path))
        try:
            ckpt = checkpoint.load(path / "last.pt")
            folder.run_id, folder.complete = ckpt.get("mlflow_run_id"), bool(ckpt.get("complete"))
            folder.where = f"epoch {ckpt.get('epoch')}, step {ckpt.get('step')}"
        except FileNotFoundError:
            folder.where = "no last.pt"
        except UserError:
            folder.where = "last.pt unreadable"
        folders.append(folder)
    return folders


def git_lines(repo: Path, *args: str) -> list[str]:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.splitlines()


def read_blobs(repo: Path, specs: list[str]) -> dict[str, str | None]:
    """`git show <rev>:<path>` for many specs in one `git cat-file --batch`; None where missing."""
    if not specs:
        return {}
    proc = subprocess.run(["git", "cat-file", "--batch"], cwd=repo, input=("\n".join(specs) + "\n").encode(),
                          capture_output=True, check=True)
    out, data, pos = {}, proc.stdout, 0
    for spec in specs:
        end = data.index(b"\n", pos)
        header = data[pos:end].decode()
        pos = end + 1
        if header.endswith("missing") or header.endswith("ambiguous"):
            out[spec] = None
            continue
        size = int(header.split()[2])
        out[spec] = data[pos:pos + size].decode(errors="replace")
        pos += size + 1
    return out


def ref_names(repo: Path) -> dict[str, str]:
    """{commit: "experiment NAME" / "branch NAME" / "tag NAME"} for the commits refs point at."""
    out: dict[str, str] = {}
    for line in git_lines(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads", "refs/tags",
                          "refs/exps"):
        sha, ref = line.split(" ", 1)
        parts = ref.split("/")
        if parts[1] == "exps" and len(parts) == 5:  # refs/exps/ab/<baseline rest>/<name>: a DVC experiment
            out.setdefault(sha, f"experiment {parts[4]}")
        elif parts[1] in ("heads", "tags"):
            out.setdefault(sha, f"{parts[1][:-1].replace('head', 'branch')} {'/'.join(parts[2:])}")
    return out


def model_md5(lock_text: str | None, weights: str) -> str | None:
    """The md5 dvc.lock records for the train stage's weights output."""
    try:
        outs = yaml.safe_load(lock_text or "")["stages"]["train"]["outs"]
    except (TypeError, KeyError, yaml.YAMLError):
        return None
    return next((o.get("md5") for o in outs if isinstance(o, dict) and o.get("path") == weights), None)


def needed_runs(repo: Path, run_id_file: str, weights: str, cache: Path) -> dict[str, list[str]]:
    """{run id: [commits/experiments]} of every commit reachable from a branch, tag or DVC
    experiment ref whose run-id file names that run and whose model is not in the DVC cache,
    plus the workspace when its own model file is missing."""
    def cached(md5: str | None) -> bool:
        return bool(md5) and (cache / "files" / "md5" / md5[:2] / md5[2:]).is_file()

    commits = git_lines(repo, "log", "--all", "--full-history", "--format=%H", "--", run_id_file, "dvc.lock")
    blobs = read_blobs(repo, [f"{c}:{p}" for c in commits for p in (run_id_file, "dvc.lock")])
    names = ref_names(repo)
    needed: dict[str, list[str]] = {}
    for c in commits:
        run_id = (blobs.get(f"{c}:{run_id_file}") or "").strip()
        if run_id and not cached(model_md5(blobs.get(f"{c}:dvc.lock"), weights)):
            needed.setdefault(run_id, []).append(f"commit {c[:8]}" + (f" ({names[c]})" if c in names else ""))
    workspace_run = repo / run_id_file
    if workspace_run.is_file() and not (repo / weights).is_file():
        lock = repo / "dvc.lock"
        if not cached(model_md5(lock.read_text() if lock.is_file() else None, weights)):
            needed.setdefault(workspace_run.read_text().strip(), []).append("the workspace")
    return needed


def decide(folder: Folder, status: str | None, needed_by: list[str]) -> None:
    """The verdict of the module docstring's rules, with the first reason that keeps the folder."""
    if folder.in_use:
        folder.reason = "in use: a process is training this job now"
    elif not folder.complete:
        folder.reason = f"unfinished job ({folder.where}): `dvc repro` with its params resumes it"
    elif status == "RUNNING":
        folder.reason = f"its MLflow run {folder.run_id} is RUNNING: the job is being completed"
    elif status == "UNKNOWN":
        folder.reason = "the MLflow store did not answer: its run's status is unknown"
    elif needed_by:
        folder.reason = (f"{', '.join(needed_by[:3])}{' ...' if len(needed_by) > 3 else ''} needs it: "
                         "its model is not in the DVC cache")
    else:
        folder.keep = False
        folder.reason = f"finished, run {status or 'not in this store'}, no commit or experiment needs it"


@dataclass
class Plan:
    folders: list[Folder]
    store_items: list = field(default_factory=list)  # tracking.cleanup.Removable
    store_note: str = ""


def dvc_cache(repo: Path) -> Path:
    """The DVC cache folder (`dvc cache dir`; .dvc/cache if DVC does not answer)."""
    lines = []
    try:
        lines = subprocess.run(["dvc", "cache", "dir"], cwd=repo, capture_output=True, text=True,
                               timeout=120).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(lines[-1]) if lines else repo / ".dvc" / "cache"


def plan(repo: Path, checkpoint_dir: Path, run_id_file: str, weights: str, client) -> Plan:
    """What would go and what stays (nothing is changed)."""
    from cifarpipe.tracking import cleanup

    folders = scan(checkpoint_dir)
    needed = needed_runs(repo, run_id_file, weights, dvc_cache(repo))
    if client is not None:  # a commit's run may only reuse the weights of the run that trained the job
        by_job: dict[str, list[str]] = {}
        for run_id, users in needed.items():
            by_job.setdefault(cleanup.trained_by(client, run_id), []).extend(users)
        needed = by_job
    result = Plan(folders)
    for folder in folders:
        status = None
        if client is not None and folder.complete and folder.run_id and not folder.in_use:
            try:
                status = cleanup.run_status(client, folder.run_id)
            except Exception:
                status = "UNKNOWN"
        elif client is None:
            status = "UNKNOWN"
        decide(folder, status, needed.get(folder.run_id or "", []))
    if client is not None:
        result.store_items = cleanup.removable(client)
    return result


def delete_folder(folder: Folder) -> int:
    """Remove the job's own files (under its claim, so no training starts meanwhile); bytes freed."""
    before = tree_size(folder.path)
    try:
        checkpoint.claim(folder.path)
    except UserError:
        folder.keep, folder.reason = True, "in use: a training of this job started meanwhile"
        return 0
    for name in OWN_FILES:
        (folder.path / name).unlink(missing_ok=True)
    checkpoint.release(folder.path)
    left = sorted(p.name for p in folder.path.iterdir())
    if left:
        folder.reason += f"; kept in the folder (not ours): {', '.join(left)}"
    else:
        folder.path.rmdir()
    return before - (tree_size(folder.path) if folder.path.exists() else 0)


def report(result: Plan, checkpoint_dir: Path, deleting: bool) -> None:
    total = sum(f.size for f in result.folders)
    print(f"checkpoint folders in {checkpoint_dir}: {len(result.folders)}, {mb(total)}")
    for f in result.folders:
        verb = "keep" if f.keep else ("delete" if deleting else "would delete")
        print(f"  {f.path.name}  {mb(f.size):>9}  run {(f.run_id or '-')[:8]:8}  {verb}: {f.reason}")
    if result.store_note:
        print(result.store_note)
    elif result.store_items:
        print(f"MLflow: {len(result.store_items)} checkpoint file(s) of FINISHED runs, "
              f"{mb(sum(i.size for i in result.store_items))} ({'deleting' if deleting else 'would delete'}):")
        for item in result.store_items:
            print(f"  run {item.run_id[:8]}  {mb(item.size):>9}  {item.what}")
    else:
        print("MLflow: no checkpoint file of a FINISHED run to delete")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cifarpipe-gc", description=__doc__.splitlines()[0],
                                 epilog="Run in the repository root. The store: MLFLOW_TRACKING_URI, else ./mlflow.db.")
    ap.add_argument("--delete", action="store_true", help="remove what the dry run lists (default: only list it)")
    ap.add_argument("--no-mlflow", action="store_true",
                    help="leave the MLflow store alone (and keep every finished job's folder: run statuses unknown)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from cifarpipe.pipeline.trial import stage_paths

    args = parser().parse_args(argv)
    repo = Path.cwd()
    paths = stage_paths(repo / "dvc.yaml")
    checkpoint_dir = paths.checkpoint_dir
    client, uri = None, ""
    if not args.no_mlflow:
        client, uri = connect_store()
    result = plan(repo, checkpoint_dir, str(paths.run_id), str(paths.weights), client)
    if client is None and not args.no_mlflow:
        result.store_note = f"MLflow: no store at {uri}: nothing to delete there"
    report(result, checkpoint_dir, args.delete)
    folders_before = sum(f.size for f in result.folders)
    store_bytes = sum(i.size for i in result.store_items)
    if args.delete:
        freed = sum(delete_folder(f) for f in result.folders if not f.keep)
        remove_store_items(client, result.store_items)
        after = sum(tree_size(f.path) for f in result.folders if f.path.exists())
        print(f"deleted: checkpoint folders {mb(folders_before)} -> {mb(after)} (freed {mb(freed)}); MLflow "
              f"checkpoint files {mb(store_bytes)} -> 0 MB ({len(result.store_items)} removed or marked deleted)")
    else:
        freeable = sum(f.size for f in result.folders if not f.keep)
        print(f"dry run: would free {mb(freeable)} of {mb(folders_before)} in checkpoint folders and "
              f"{mb(store_bytes)} in MLflow; run `cifarpipe-gc --delete` to do it")
    finish_commands(repo, client, uri)
    return 0


def connect_store():
    """(client, uri) of the store, or (None, uri) when its SQLite file does not exist."""
    from cifarpipe.tracking import store

    uri = store.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None, uri
    return store.connect(), uri


def remove_store_items(client, items: list) -> None:
    from cifarpipe.tracking import cleanup

    for item in items:
        cleanup.remove(client, item)


def finish_commands(repo: Path, client, uri: str) -> None:
    """The commands that finish the job, with what they would work on."""
    from cifarpipe.tracking import cleanup

    print("to finish:")
    if client is not None:
        runs, size = cleanup.deleted_runs(client)
        print(f"  {cleanup.gc_command(uri)}\n      # removes the {runs} deleted run(s) ({mb(size)} of artifacts) and the "
              "logged models deleted in MLflow, for good")
    cache = dvc_cache(repo)
    print(f"  dvc gc --workspace --all-commits --all-experiments --dry\n      # lists what the DVC cache "
          f"({cache}, {mb(tree_size(cache) if cache.is_dir() else 0)}) holds for no commit or experiment; "
          "without --dry it removes it (keep these flags: the checkpoints kept above count on the cache)")
    leftovers = sorted(p for p in (repo / ".dvc/tmp/exps").glob("tmp*") if p.is_dir())
    if leftovers:
        print("  DVC's temporary copies under .dvc/tmp/exps/ (a killed queue worker leaves its copy behind); "
              "remove them by hand once `dvc queue status` shows no task Running:")
        for p in leftovers:
            print(f"      rm -rf {os.path.relpath(p, repo)}   # {mb(tree_size(p))}")


def cli() -> None:
    """The console entry point: a UserError prints one line and exits 2."""
    from cifarpipe.pipeline.stage import run_stage

    run_stage(main)


if __name__ == "__main__":
    cli()
