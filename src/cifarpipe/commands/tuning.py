"""What a hyperparameter search is (pure: no Optuna run, no MLflow, no files written): the search
file's schema (tune/space.yaml), its check against params.yaml, the params of one trial, and the
recipe that reproduces a trial through the pipeline (`dvc exp run -S recipe=<name>`).

Every value a trial can take is validated by config.py before any training: the bounds of each
range, each choice, the fixed values and the first trials. A combination that only fails across
keys (e.g. Nesterov with momentum 0) fails that trial alone, naming the key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cifarpipe.config import (Params, UserError, describe_error, flatten, flatten_mapping, parse_params, read_yaml_text,
                              set_dotted, unflatten)

RECIPE_SECTIONS = ("model", "train", "evaluate")  # what a recipe may set (config.read_recipe)
EPOCHS_KEY = "train.epochs"  # set by the search file's `epochs`, never searched
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a study or recipe name: it names files


class _Strict(BaseModel):
    # as config.py's schema: a typo is an error, "0.1" (a string) is no number
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FloatRange(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False  # sample log-uniformly (learning rates, weight decay); needs low > 0
    step: float | None = Field(None, gt=0)  # a grid low, low + step, ...; not with log


class IntRange(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)


class Choice(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


Space = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class SamplerSpec(_Strict):
    name: Literal["tpe", "random"] = "tpe"
    # TPE samples at random until this many trials are done, then models the good region; Optuna's
    # default of 10 would leave a search of 8 trials entirely random.
    startup_trials: int = Field(3, ge=1)
    seed: int = Field(0, ge=0)  # a study run in one go by one worker draws the same trials again


class PrunerSpec(_Strict):
    # median: a trial stops when its validation accuracy at an epoch is below the median of the
    # earlier trials at that epoch | none: every trial runs all its epochs
    name: Literal["median", "none"] = "median"
    startup_trials: int = Field(2, ge=0)  # trials that always run to the end, the median's basis
    warmup_epochs: int = Field(1, ge=0)  # epochs of every trial that are never pruned


class TuneSpec(_Strict):
    study: str | None = None  # the study's name (its journal file, its MLflow parent run); default: the file's stem
    trials: int = Field(ge=1)  # finished (complete or pruned) trials the study ends with
    epochs: int = Field(ge=1)  # train.epochs of every trial, and of the winner's recipe
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    params: dict[str, Space] = Field(min_length=1)  # dotted params.yaml keys -> where to search
    fixed: dict[str, Any] = {}  # dotted keys -> the value every trial uses
    first_trials: list[dict[str, Any]] = []  # points tried first (e.g. the current defaults), once per study

    @model_validator(mode="after")
    def _ranges(self) -> TuneSpec:
        for key, space in self.params.items():
            if isinstance(space, (FloatRange, IntRange)):
                if space.low > space.high:
                    raise ValueError(f"params.{key}: low ({space.low}) is above high ({space.high})")
                if space.log and space.low <= 0:
                    raise ValueError(f"params.{key}: log: true needs low > 0 (it is {space.low})")
                if isinstance(space, FloatRange) and space.log and space.step is not None:
                    raise ValueError(f"params.{key}: log and step exclude each other")
        return self


def load_spec(path: Path) -> tuple[TuneSpec, str]:
    """The search file, validated for shape; and the study's name."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such search file (see tune/space.yaml)") from None
    raw = read_yaml_text(text, str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (trials, epochs, params, ...)")
    try:
        spec = TuneSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError("\n".join(describe_error(err, str(path)) for err in e.errors())) from None
    study = spec.study or path.stem
    if not NAME.match(study):
        raise UserError(f"{path}: study = {study!r}: letters, digits, '.', '_' and '-' only (it names files)")
    return spec, study


def with_values(base: Params, values: dict[str, Any], source: str) -> Params:
    """`base` with dotted `values` set, validated again by config.py (UserError naming the key)."""
    raw = base.model_dump()
    for key, value in values.items():
        if not set_dotted(raw, key, value):
            raise UserError(f"{source}: unknown key {key!r}")
    return parse_params(raw, source)


def settings(spec: TuneSpec, path: Path) -> dict[str, object]:
    """The search's settings as the parent run's params."""
    out: dict[str, object] = {"search_file": str(path), "trials": spec.trials, "epochs_per_trial": spec.epochs,
                              "sampler": f"{spec.sampler.name} (startup {spec.sampler.startup_trials}, seed "
                                         f"{spec.sampler.seed})",
                              "pruner": f"{spec.pruner.name} (startup {spec.pruner.startup_trials}, warm-up "
                                        f"{spec.pruner.warmup_epochs} epochs)"}
    for key, space in spec.params.items():
        out[f"space.{key}"] = (f"one of {space.choices}" if isinstance(space, Choice) else
                               f"{space.type} {space.low}..{space.high}" + (" log" if space.log else ""))
    out.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    return out


def trial_value(val_accuracies: list[float], weights: str) -> float:
    """A trial's value: the validation accuracy of the weights the pipeline keeps for the same
    params (evaluate.weights): best, the highest epoch's; last, the last epoch's."""
    return max(val_accuracies) if weights == "best" else val_accuracies[-1]


def trial_values(spec: TuneSpec, searched: dict[str, Any]) -> dict[str, Any]:
    """Every value a trial sets: the fixed ones, the epochs, the searched ones."""
    return {**spec.fixed, EPOCHS_KEY: spec.epochs, **searched}


def check_spec(spec: TuneSpec, base: Params, path: Path) -> None:
    """Reject, before any training, a key that is no training param and any value config.py refuses."""
    leaves = flatten(base)
    for group, keys in (("params", spec.params), ("fixed", spec.fixed)):
        for key in keys:
            if key.split(".")[0] not in RECIPE_SECTIONS or key not in leaves:
                raise UserError(f"{path}: {group}.{key}: not a key of params.yaml's {'/'.join(RECIPE_SECTIONS)} "
                                "sections (what a recipe sets)")
            if key == EPOCHS_KEY:
                raise UserError(f"{path}: {group}.{key}: set by `epochs` (every trial trains that many)")
    if both := sorted(set(spec.params) & set(spec.fixed)):
        raise UserError(f"{path}: {', '.join(both)}: both searched (params) and fixed")
    with_values(base, trial_values(spec, {}), f"{path} (fixed, epochs)")
    for key, space in spec.params.items():
        ends = space.choices if isinstance(space, Choice) else [space.low, space.high]
        for value in ends:
            with_values(base, trial_values(spec, {key: value}), f"{path} params.{key} {value!r}")
    for i, point in enumerate(spec.first_trials):
        for key, value in point.items():
            if key not in spec.params:
                raise UserError(f"{path}: first_trials[{i}].{key}: not one of the searched params")
            if not contains(spec.params[key], value):
                raise UserError(f"{path}: first_trials[{i}].{key} = {value!r}: outside its search space")
        with_values(base, trial_values(spec, point), f"{path} first_trials[{i}]")


def contains(space: Space, value: Any) -> bool:
    if isinstance(space, Choice):
        return value in space.choices
    return not isinstance(value, bool) and isinstance(value, (int, float)) and space.low <= value <= space.high


def suggest(trial: Any, spec: TuneSpec) -> dict[str, Any]:
    """The searched values of an Optuna trial (its parameter names are the dotted keys)."""
    out = {}
    for key, space in spec.params.items():
        if isinstance(space, FloatRange):
            out[key] = trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
        elif isinstance(space, IntRange):
            out[key] = trial.suggest_int(key, space.low, space.high, log=space.log, step=space.step)
        else:
            out[key] = trial.suggest_categorical(key, space.choices)
    return out


# ---------------------------------------------------------------- the winner as a recipe
RECIPE_MARK = "# cifarpipe-tune study "  # the first line of a recipe the command wrote (it may rewrite it)


def written_by(text: str) -> str | None:
    """The study that wrote a recipe file, or None for a recipe written by hand."""
    first = text.splitlines()[0] if text else ""
    return first[len(RECIPE_MARK):].split()[0] if first.startswith(RECIPE_MARK) else None


def recipe_values(own: Params, effective: Params, spec: TuneSpec) -> dict[str, Any]:
    """The flattened model/train/evaluate values of the trial that differ from params.yaml's own
    values (without its recipe), plus every searched and fixed key and the epochs: applied to
    params.yaml by `-S recipe=<name>`, they give the trial's params exactly."""
    mine, theirs = flatten(own), flatten(effective)
    named = set(spec.params) | set(spec.fixed) | {EPOCHS_KEY}
    return {k: v for k, v in theirs.items()
            if k.split(".")[0] in RECIPE_SECTIONS and (k in named or mine[k] != v)}


def recipe_text(study: str, header: list[str], values: dict[str, Any]) -> str:
    body = yaml.safe_dump(unflatten(values), sort_keys=False, default_flow_style=False)
    return "\n".join([RECIPE_MARK + study, *(f"# {line}" for line in header)]) + "\n" + body


def own_params(params_path: Path) -> Params:
    """params.yaml's own values, without its recipe: what a recipe's values replace."""
    return parse_params(read_yaml_text(params_path.read_text(), str(params_path)), str(params_path))


def check_recipe(values: dict[str, Any], own: Params) -> None:
    """The recipe's values over params.yaml must parse (what load_params will do with it)."""
    raw = own.model_dump()
    for key, value in flatten_mapping(unflatten(values)).items():
        set_dotted(raw, key, value)
    parse_params(raw, "the winner's recipe")
