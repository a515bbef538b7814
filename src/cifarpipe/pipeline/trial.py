"""One trial of a hyperparameter search: the train stage's training, on the split's training part,
validated on its validation part (never the test set), without checkpoints, outputs or MLflow.

The same data (pipeline.train.load_data), batches (pipeline.train.epoch_batches), setup
(pipeline.train.build_setup), kernel warm-up (pipeline.train.prepare_steps) and loop (engine.fit,
with train.early_stopping) as the train stage, in the same order from the same seeds: a trial's per-epoch validation accuracy
is what `dvc exp run -S recipe=<its recipe>` logs, on the same machine with the same number of CPU
threads. After each epoch `on_epoch(row)`
says whether to stop (a pruned trial).
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from cifarpipe.config import Params, UserError
from cifarpipe.pipeline.train import TrainingData, TrainPaths, build_setup, epoch_batches, load_data, prepare_steps
from cifarpipe.training import engine
from cifarpipe.training.distributed import Group

_TRAIN_STAGE = "train"


def stage_paths(dvc_yaml: Path = Path("dvc.yaml")) -> TrainPaths:
    """The train stage's paths as dvc.yaml (the one place that names them) passes them."""
    try:
        cmd = yaml.safe_load(dvc_yaml.read_text())["stages"][_TRAIN_STAGE]["cmd"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"{dvc_yaml}: no readable train stage ({type(e).__name__}: {e}); run from the repository "
                        "root") from None
    args = shlex.split(cmd)
    flags = {args[i][2:].replace("-", "_"): Path(args[i + 1]) for i in range(len(args) - 1) if args[i].startswith("--")}
    try:
        return TrainPaths(**{k: flags[k] for k in TrainPaths.__dataclass_fields__})
    except KeyError as e:
        raise UserError(f"{dvc_yaml}: the train stage's command lacks --{str(e.args[0]).replace('_', '-')}") from None


def load_trial_data(params: Params, dvc_yaml: Path = Path("dvc.yaml")) -> TrainingData:
    """The split's training and validation parts, as the train stage loads them."""
    paths = stage_paths(dvc_yaml)
    for path in (paths.data, paths.split):
        if not path.exists():
            raise UserError(f"{path}: not found; run `dvc repro split` first (the search trains on its data)")
    return load_data(paths, params)


class _TrialHooks(engine.LoopHooks):
    def __init__(self, on_epoch: Callable[[dict[str, float]], bool]) -> None:
        self.on_epoch, self.stop = on_epoch, False

    def epoch_finished(self, state: engine.TrainState, row: dict[str, float], improved: bool) -> None:
        self.stop = self.on_epoch(row)

    def stop_requested(self, inside_epoch: bool) -> bool:
        return self.stop and not inside_epoch


def train_trial(params: Params, data: TrainingData, device: torch.device,
                on_epoch: Callable[[dict[str, float]], bool]) -> engine.TrainState:
    """Train `params` for params.train.epochs epochs, or until train.early_stopping ends it (as in
    the train stage: state.stopped_early) or `on_epoch(row)` returns True (a pruned trial). The
    state's history holds the per-epoch rows (the train stage's history.csv columns)."""
    steps_per_epoch, train_batches, val_batches = epoch_batches(data, params, device, Group())
    setup = build_setup(data, params, device, Group(), steps_per_epoch)
    state = engine.TrainState()
    prepare_steps(setup, state, params.train, train_batches, log=lambda line: None)
    engine.fit(setup, state, params.train.epochs, train_batches, val_batches, steps_per_epoch,
               _TrialHooks(on_epoch), log_every=0, early_stopping=params.train.early_stopping)
    return state
