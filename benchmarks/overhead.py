"""What the pipeline's `train` and `evaluate` stages cost beyond training itself, as a user waits for it.

A fresh clone of the repository at a commit, params set (a local archive, its md5, few epochs),
committed like a user's; `dvc repro split` once (untimed, with `download`); then per round:

  (a) the import floor: `python -c "import torch, mlflow"` (what any stage pays before it can work),
      and `python -c pass` beside it (the interpreter's own start and exit);
  (b) `dvc repro --force --single-item train evaluate`: one `dvc repro` that reruns both stages,
      as after a change of a train param, wall time; outputs/train_metrics.json's `train_seconds`
      (the time the training epochs themselves took, as the stage measured it).

overhead_s = repro wall - train_seconds; ratio = overhead_s / floor_s. With --separate, (b) is two
commands, `dvc repro --force --single-item train`, then `... evaluate` (DVC's own start, 0.7 s on a
2-core CPU, is paid twice), and overhead_s = (train wall - train_seconds) + evaluate wall.

Besides the dvc-level wall (what a user waits for, DVC's own start-up, hashing and caching
included), each stage command's own process is timed inside the same `dvc repro`: DVC runs a stage
command as `$SHELL [--noprofile --norc] -c CMD` (dvc/stage/run.py, dvc 3.x), so for the run $SHELL
is a small wrapper of the same name that times CMD under the real shell (wall, user and system
CPU) and passes everything else through. No stage runs twice and nothing in the clone changes; if
a DVC version stops using $SHELL, the stage-process columns are empty and the rest still holds.

Relies only on: dvc.yaml's stage names (download, split, train, evaluate), params.yaml's keys
data.url, data.md5 and train.epochs (plus any --set), and outputs/train_metrics.json with
`train_seconds`. The code under src/ may move freely: the clone's own src/ is on PYTHONPATH, so
its stages run its code, not an installed copy.

  .venv/bin/python benchmarks/overhead.py --archive /path/cifar-10-python.tar.gz \\
      --md5 c58f30108f718f92721af3b95e74349a --epochs 3 --rounds 3 --out /tmp/overhead.json

Stage output (stdout and stderr of each `dvc repro`) is kept per round in the work folder
(--keep keeps it all); the phase line each stage prints at its end (cifarpipe.pipeline.phases)
lands in the JSON per round, and the medians of the phases in the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS_FILE = "outputs/train_metrics.json"
FLOOR_CODE = "import torch, mlflow"
# Settings that change what is measured, recorded with the results (not changed).
ENV_RECORDED = ("PYTHONDONTWRITEBYTECODE", "PYTHONOPTIMIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
MLFLOW_ENV_DROPPED = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")

# Stand-in for the user's $SHELL while `dvc repro` runs. Named like the real shell, so DVC passes
# the options it would pass to it (bash: --noprofile --norc), forwarded unchanged. Appends one line
# per stage command: stage <TAB> exit status <TAB> wall <TAB> user CPU <TAB> system CPU (seconds,
# the command and all its children, from bash's `time`). The command's own stdout and stderr are
# untouched (fd 4 is the original stderr).
SHELL_WRAPPER = r"""#!/bin/bash
exec 4>&2
TIMEFORMAT=$'%3R\t%3U\t%3S'
{ time "$OVERHEAD_REAL_SHELL" "$@" 2>&4 4>&- ; } 2>"$OVERHEAD_STAGE_LOG.time"
rc=$?
printf '%s\t%s\t%s\n' "${DVC_STAGE:-?}" "$rc" "$(tail -n 1 "$OVERHEAD_STAGE_LOG.time")" >>"$OVERHEAD_STAGE_LOG"
exit $rc
"""


# ---------------------------------------------------------------- small helpers
def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path | None = None,
        check: bool = True) -> tuple[float, float, str, int]:
    """Run `cmd`; return (wall seconds, CPU seconds of it and its children, output, exit status).
    Output (stdout and stderr together, in order) goes to `log` too."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if log is not None:
        log.write_text(f"$ {shlex.join(cmd)}\n{proc.stdout}")
    if check and proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed (exit {proc.returncode}) in {cwd}:\n{proc.stdout[-4000:]}")
    return wall, cpu, proc.stdout, proc.returncode


def git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ws), *args], check=True, capture_output=True, text=True).stdout.strip()


def set_params(path: Path, values: dict[str, object]) -> None:
    """Write dotted KEY=VALUE pairs into the workspace's params.yaml (a throwaway copy: PyYAML
    rewrites it without its comments). A key must exist already: a typo would otherwise be a silent
    no-op in the benchmark."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    for key, value in values.items():
        node, parts = doc, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                sys.exit(f"params.yaml has no {key!r} (no {part!r})")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            sys.exit(f"params.yaml has no {key!r}")
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def stage_cmds(ws: Path) -> dict[str, str]:
    """Each stage's command, as dvc.yaml writes it (a list of commands joined with ' && ')."""
    import yaml

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    return {name: (" && ".join(s["cmd"]) if isinstance(s.get("cmd"), list) else str(s.get("cmd", "")))
            for name, s in stages.items()}


def option_value(cmd: str, option: str) -> str | None:
    """The value of `--option VALUE` (or --option=VALUE) in a stage command, if it has one."""
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        if word == option and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def read_stage_log(path: Path) -> dict[str, dict[str, float]]:
    """The wrapper's lines since the file was last emptied: per stage, the summed wall / CPU of its commands."""
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 5:
            continue
        stage, rc, real, user, sys_ = parts
        try:
            row = out.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0, "commands": 0, "exit": 0})
            row["wall_s"] += float(real)
            row["cpu_s"] += float(user) + float(sys_)
            row["commands"] += 1
            row["exit"] = row["exit"] or int(rc)
        except ValueError:
            continue
    return out


# The stage's own account (cifarpipe.pipeline.phases):
#   "train stage: 20.3 s = start 2.6 + load data 0.8 + ...; warm-up 2.3 in the background (...)"
PHASES_LINE = re.compile(r"^(\w+) stage: [\d.]+ s = (.+?)(?: \(\w+=1: one line per phase\))?$", re.MULTILINE)
PHASE = re.compile(r"([\w -]+?) ([\d.]+)(?: in the background)?$")


def collect_phases(output: str, stage: str) -> dict[str, float] | None:
    """The phases the stage printed last (None if it prints none): {phase: seconds}, background
    work under "background <name>"."""
    found = None
    for name, text in PHASES_LINE.findall(output):
        if name != stage:
            continue
        laps, _, background = text.partition("; ")
        found = {}
        for part, prefix in [(p, "") for p in laps.split(" + ")] + [(p, "background ") for p in background.split("; ") if p]:
            if m := PHASE.match(part.strip()):
                found[prefix + m.group(1)] = float(m.group(2))
    return found


def load_text() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions(python: str, env: dict[str, str], cwd: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, platform\n"
            "v = {'python': platform.python_version()}\n"
            "for n in ('torch', 'mlflow', 'dvc', 'numpy'):\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: v[n] = None\n"
            "print(json.dumps(v))")
    return json.loads(subprocess.run([python, "-c", code], cwd=cwd, env=env, check=True, capture_output=True,
                                     text=True).stdout)


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- the benchmark
def prepare(args, work: Path, env: dict[str, str], dvc: list[str]) -> tuple[Path, str, dict]:
    """The workspace: a clone at the commit, params written and committed, data built (untimed)."""
    import yaml

    repo = Path(args.repo).resolve()
    commit = git(repo, "rev-parse", "--verify", f"{args.rev}^{{commit}}")
    if git(repo, "status", "--porcelain", "--untracked-files=no"):
        print(f"note: {repo} has uncommitted changes; the benchmark runs commit {commit[:12]} only", file=sys.stderr)
    ws = work / "ws"
    subprocess.run(["git", "clone", "-q", str(repo), str(ws)], check=True)
    git(ws, "checkout", "-q", "--detach", commit)
    values = {"data.url": str(Path(args.archive).resolve()), "data.md5": args.md5, "train.epochs": args.epochs}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(value)  # 3 -> int, 0.1 -> float, true -> bool
    set_params(ws / "params.yaml", values)
    ident = ["-c", "user.name=overhead-benchmark", "-c", "user.email=overhead-benchmark@localhost"]
    subprocess.run(["git", "-C", str(ws), *ident, "commit", "-qam", "benchmark params"], check=True)
    info = {"params_set": {k: v for k, v in values.items()}}
    t0 = time.perf_counter()
    run([*dvc, "repro", "split"], ws, env, log=work / "logs" / "prepare_split.log")
    info["prepare_split_s"] = round(time.perf_counter() - t0, 2)
    # dvc.lock and the data's .gitignore, committed: a user's clean state after building the data.
    subprocess.run(["git", "-C", str(ws), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(ws), *ident, "commit", "-qm", "data built", "--allow-empty"], check=True)
    if args.store_warmup:
        # MLflow's default store (./mlflow.db) created before the rounds, so round 1 does not pay
        # the one-time schema creation the others don't (its cost is reported, not hidden).
        wall, _, _, rc = run([args.python, "-c", "from mlflow.tracking import MlflowClient\n"
                              "MlflowClient().search_experiments(max_results=1)"], ws, env,
                             log=work / "logs" / "store_init.log", check=False)
        info["store_init_s"] = round(wall, 3) if rc == 0 else None
    return ws, commit, info


def repro(stages: list[str], ws: Path, env: dict[str, str], dvc: list[str], logs: Path, tag: str
          ) -> tuple[float, dict[str, dict]]:
    """One `dvc repro --force --single-item <stages>`: its wall seconds, and per stage the figures
    of its command's own process and its phase line. A single stage's row also has the command's
    wall and CPU and DVC's share (wall_s, cpu_s, dvc_s); with several those stay None, DVC's own
    time not being split between the stages."""
    stage_log = Path(env["OVERHEAD_STAGE_LOG"])
    stage_log.write_text("")
    log = logs / f"{tag}_{'_'.join(stages)}.log"
    wall, cpu, output, rc = run([*dvc, "repro", "--force", "--single-item", *stages], ws, env, log=log, check=False)
    if rc:
        sys.exit(f"dvc repro {' '.join(stages)} failed (exit {rc}); see {log}:\n{output[-3000:]}")
    procs, rows = read_stage_log(stage_log), {}
    for stage in stages:
        proc = procs.get(stage, {})
        rows[stage] = {"wall_s": None, "cpu_s": None, "proc_wall_s": proc.get("wall_s"),
                       "proc_cpu_s": proc.get("cpu_s"), "phases": collect_phases(output, stage), "dvc_s": None}
    if len(stages) == 1:
        row = rows[stages[0]]
        row.update(wall_s=wall, cpu_s=cpu)
        row["dvc_s"] = wall - row["proc_wall_s"] if row["proc_wall_s"] is not None else None
    return wall, rows


def round_row(args, i: int, ws: Path, env: dict[str, str], dvc: list[str], logs: Path, clean: list[Path]) -> dict:
    load_before = os.getloadavg()
    floor, floor_cpu, _, _ = run([args.python, "-c", FLOOR_CODE], ws, env)
    startup, _, _, _ = run([args.python, "-c", "pass"], ws, env)
    for path in clean:  # a finished job's checkpoint would make the stage complete from it instead of training
        shutil.rmtree(path, ignore_errors=True)
    repro_wall = None
    if args.separate:
        train = repro(["train"], ws, env, dvc, logs, f"round{i}")[1]["train"]
    else:
        repro_wall, rows = repro(["train", "evaluate"], ws, env, dvc, logs, f"round{i}")
        train, evaluate = rows["train"], rows["evaluate"]
    metrics = json.loads((ws / args.metrics_file).read_text())
    train_seconds = float(metrics["train_seconds"])
    if args.separate:
        evaluate = repro(["evaluate"], ws, env, dvc, logs, f"round{i}")[1]["evaluate"]
        overhead = (train["wall_s"] - train_seconds) + evaluate["wall_s"]
    else:
        overhead = repro_wall - train_seconds
    proc_overhead = None
    if train["proc_wall_s"] is not None and evaluate["proc_wall_s"] is not None:
        proc_overhead = (train["proc_wall_s"] - train_seconds) + evaluate["proc_wall_s"]
    row = {
        "round": i, "floor_s": floor, "floor_cpu_s": floor_cpu, "python_startup_s": startup, "repro_wall_s": repro_wall,
        "train_wall_s": train["wall_s"], "train_seconds": train_seconds, "train_proc_s": train["proc_wall_s"],
        "train_cpu_s": train["cpu_s"], "train_proc_cpu_s": train["proc_cpu_s"], "train_dvc_s": train["dvc_s"],
        "evaluate_wall_s": evaluate["wall_s"], "evaluate_proc_s": evaluate["proc_wall_s"],
        "evaluate_cpu_s": evaluate["cpu_s"], "evaluate_proc_cpu_s": evaluate["proc_cpu_s"],
        "evaluate_dvc_s": evaluate["dvc_s"],
        "overhead_s": overhead, "overhead_proc_s": proc_overhead, "ratio": overhead / floor,
        "ratio_proc": proc_overhead / floor if proc_overhead is not None else None,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "train_phases": train["phases"], "evaluate_phases": evaluate["phases"],
    }
    if (train["proc_wall_s"] or train["wall_s"] or 0) < train_seconds:
        print(f"warning: round {i}: train took less than train_seconds {train_seconds:.1f} s {train_seconds:.1f} s: the stage "
              "did not train (it resumed a finished job?); pass --clean with its checkpoint folder", file=sys.stderr)
    return row


COLUMNS = [("floor_s", "floor"), ("python_startup_s", "py -c pass"), ("repro_wall_s", "repro wall"),
           ("train_wall_s", "train wall"),
           ("train_proc_s", "train proc"), ("train_seconds", "train_seconds"), ("evaluate_wall_s", "eval wall"),
           ("evaluate_proc_s", "eval proc"), ("overhead_s", "overhead"), ("overhead_proc_s", "overhead proc"),
           ("ratio", "ratio")]


def table(rows: list[dict], summary: dict) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    width = max(len(title) for _, title in COLUMNS) + 1
    lines = ["".join(f"{'':10}") + "".join(f"{title:>{width}}" for _, title in COLUMNS)]
    for r in rows:
        lines.append(f"{'round ' + str(r['round']):10}" + "".join(f"{cell(r[k]):>{width}}" for k, _ in COLUMNS))
    lines.append(f"{'median':10}" + "".join(f"{cell(summary[k]):>{width}}" for k, _ in COLUMNS))
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--repo", default=str(REPO), help="git repository to benchmark (default: this checkout)")
    ap.add_argument("--rev", default="HEAD", help="commit of --repo (default HEAD; uncommitted changes are not seen)")
    ap.add_argument("--archive", required=True, help="local CIFAR-10 archive (cifar-10-python.tar.gz): data.url")
    ap.add_argument("--md5", required=True, help="its md5: data.md5")
    ap.add_argument("--epochs", type=int, default=3, help="train.epochs (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of floor, train, evaluate (default 3)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more params.yaml values, dotted keys, YAML values (repeatable)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--python", default=sys.executable,
                    help="the environment's python; its folder goes first on PATH (`python` of the stage "
                         "commands, `dvc`) (default: this interpreter)")
    ap.add_argument("--metrics-file", default=METRICS_FILE, help=f"train's metrics file (default {METRICS_FILE})")
    ap.add_argument("--clean", action="append", default=None, metavar="PATH",
                    help="folder of the workspace removed before every train round (default: the train command's "
                         "--checkpoint-dir, if it has one)")
    ap.add_argument("--no-store-warmup", dest="store_warmup", action="store_false",
                    help="let round 1 create MLflow's ./mlflow.db instead of creating it before the rounds")
    ap.add_argument("--separate", action="store_true",
                    help="two `dvc repro` commands per round, train then evaluate (default: one for both)")
    ap.add_argument("--workdir", type=Path, help="where the temporary workspace goes (default: the system's temp)")
    ap.add_argument("--keep", action="store_true", help="keep the workspace and the logs")
    return ap.parse_args()


def environment(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """The stages' environment: this Python's tools first, the clone's library, $SHELL the timing wrapper."""
    real_shell = os.environ.get("SHELL") or "/bin/sh"
    (work / "shell").mkdir()
    wrapper = work / "shell" / Path(real_shell).name  # DVC picks its options from the shell's name
    wrapper.write_text(SHELL_WRAPPER)
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_DROPPED}
    env.update({"PATH": f"{Path(args.python).parent}{os.pathsep}{os.environ.get('PATH', '')}", "SHELL": str(wrapper),
                "OVERHEAD_REAL_SHELL": real_shell, "OVERHEAD_STAGE_LOG": str(work / "stage_times.tsv"),
                # The clone's own library, whatever is installed (an editable install points elsewhere).
                "PYTHONPATH": str(work / "ws" / "src")})
    return env


def summarize(rows: list[dict]) -> dict:
    """Medians of every figure, the phases included."""
    keys = [k for k in rows[0] if (rows[0][k] is None or isinstance(rows[0][k], (int, float))) and k != "round"]
    summary = {k: median([r[k] for r in rows]) for k in keys}
    for stage in ("train", "evaluate"):
        phases = [r[f"{stage}_phases"] or {} for r in rows]
        summary[f"{stage}_phases"] = {k: median([p.get(k) for p in phases]) for k in phases[-1]}
    return summary


def benchmark(args: argparse.Namespace, work: Path, env: dict[str, str], dvc: list[str]) -> dict:
    ws, commit, info = prepare(args, work, env, dvc)
    cmds = stage_cmds(ws)
    missing = [s for s in ("download", "split", "train", "evaluate") if s not in cmds]
    if missing:
        sys.exit(f"dvc.yaml has no stage {', '.join(missing)}")
    ckpt = option_value(cmds["train"], "--checkpoint-dir")
    clean = [ws / p for p in args.clean] if args.clean is not None else ([ws / ckpt] if ckpt else [])
    run([args.python, "-c", FLOOR_CODE], ws, env)  # untimed: the files into the page cache once
    started, uptime_before, rows = datetime.now(timezone.utc), load_text(), []
    for i in range(1, args.rounds + 1):
        rows.append(round_row(args, i, ws, env, dvc, work / "logs", clean))
        r = rows[-1]
        walls = (f"train wall {r['train_wall_s']:.1f} s, evaluate wall {r['evaluate_wall_s']:.1f} s" if args.separate
                 else f"dvc repro wall {r['repro_wall_s']:.1f} s")
        print(f"round {i}: floor {r['floor_s']:.2f} s, {walls} (train_seconds {r['train_seconds']:.1f}), overhead "
              f"{r['overhead_s']:.1f} s", flush=True)
    return {
        "what": "overhead of the train and evaluate stages beyond training (benchmarks/overhead.py)",
        "definition": ("overhead_s = (train_wall_s - train_seconds) + evaluate_wall_s; *_wall_s: `dvc repro --force "
                       "--single-item <stage>`" if args.separate else "overhead_s = repro_wall_s - train_seconds; "
                       "repro_wall_s: `dvc repro --force --single-item train evaluate`") + "; ratio = overhead_s / "
                      "floor_s; *_proc_s: the stage command's own process inside it; overhead_proc_s = "
                      "(train_proc_s - train_seconds) + evaluate_proc_s; floor_s: python -c 'import torch, mlflow'",
        "mode": "separate" if args.separate else "together",
        "date": started.isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv]),
        "repo": str(Path(args.repo).resolve()), "rev": args.rev, "commit": commit,
        "epochs": args.epochs, "rounds": args.rounds, "set": args.set,
        "machine": {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "uptime_before": uptime_before, "uptime_after": load_text(),
                    "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ}},
        "versions": versions(args.python, env, ws), "stage_cmds": {k: cmds[k] for k in ("train", "evaluate")},
        "prepare": info, "median": summarize(rows), "rounds_detail": rows,
    }


def main() -> None:
    args = parse_args()
    bindir = Path(args.python).parent
    dvc = [str(bindir / "dvc")] if (bindir / "dvc").exists() else [args.python, "-m", "dvc"]
    work = Path(tempfile.mkdtemp(prefix="overhead-", dir=args.workdir))
    (work / "logs").mkdir()
    try:
        result = benchmark(args, work, environment(args, work), dvc)
        summary = result["median"]
        print(table(result["rounds_detail"], summary))
        for stage in ("train", "evaluate"):
            phases = summary[f"{stage}_phases"]
            if phases:
                print(f"{stage} phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        # Each round's ratio is its overhead over its own floor (the machine's speed drifts between
        # rounds); their median is the figure, and need not equal the median overhead / median floor.
        ratios = sorted(r["ratio"] for r in result["rounds_detail"])
        print(f"ratio to the import floor, median of the rounds: {summary['ratio']:.2f}x (rounds {ratios[0]:.2f}-"
              f"{ratios[-1]:.2f}); stage processes {summary['ratio_proc']:.2f}x. Medians: overhead "
              f"{summary['overhead_s']:.1f} s, stage processes {summary['overhead_proc_s']:.1f} s, floor "
              f"{summary['floor_s']:.2f} s; machine: {result['machine']['uptime_after']}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept: {work} (workspace ws/, logs/)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
