"""The typed schema of params.yaml: every key, its type and its allowed range.

params.yaml is the one source of truth for hyperparameters. Each stage loads the file through
`load_params`, which rejects unknown keys, wrong types and impossible values *before any work
starts*, naming the key and the value, e.g.

    params.yaml: split.val_fraction = 1.5: must be > 0 and < 1
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifarpipe.dotted import flatten_mapping, set_dotted, unflatten  # noqa: F401  (unflatten: part of this module's API)


class UserError(Exception):
    """A mistake the user can fix (bad params, bad archive, unreachable URL): printed without traceback."""


class _Strict(BaseModel):
    # extra="forbid": a typo such as `lrr:` is an error, not a silently ignored key.
    # strict=True: "0.1" (a string) is not accepted where a float is expected.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SCHEMES = ("http", "https", "file", "")


class DataParams(_Strict):
    url: str
    md5: str
    retries: int = Field(ge=0, le=10)  # extra attempts after a network failure
    timeout_s: float = Field(gt=0)  # per network read, seconds

    @field_validator("md5")
    @classmethod
    def _md5(cls, v: str) -> str:
        if not _MD5.match(v):
            raise ValueError("must be 32 lowercase hex digits")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        # A one-letter scheme is a Windows drive ("C:\\data\\cifar.tar.gz"): a plain local path.
        if scheme not in _SCHEMES and len(scheme) != 1:
            raise ValueError(f"unsupported URL scheme {scheme!r}: use http(s)://, file:// or a local path")
        return v


# torch's CPU generator (initial weights, batch orders) keeps a seed's low 32 bits: seed 2**32 + s
# would train exactly as s, recorded under another seed. torch itself takes up to 2**64 - 1.
SEED_MAX = 2**32 - 1


class SplitParams(_Strict):
    # course: the indices of the course's torch random_split call; hash: sha256 order (see split.py)
    method: Literal["course", "hash"]
    val_fraction: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0, le=SEED_MAX)  # method course seeds a torch generator (see SEED_MAX)


class ModelParams(_Strict):
    name: Literal["course_cnn", "cifar_resnet", "airnet"]
    width: int = Field(ge=8, le=1024)  # cifar_resnet's base channels; airnet's first block (then 4x); course_cnn ignores it
    # Test-time augmentation, part of the model's inference path: evaluate, cifarpipe-predict and the
    # MLflow model average the logits of these views. Defaulted: weights files without it load as "none".
    tta: Literal["none", "flip", "flip_translate"] = "none"


class _KeyProblem(ValueError):
    """A check across keys (e.g. nesterov needs momentum), reported at the key it names, relative to
    the section that raised it: `params.yaml: train.optimizer.nesterov = True: ...`, not the whole section."""

    def __init__(self, key: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.key, self.value, self.message = key, value, message


class OptimizerParams(_Strict):
    # One flat section for both optimizers: `-S train.optimizer.name=sgd` switches with one flag and
    # every value stays visible in params.yaml. Keys of the optimizer not chosen are validated too
    # (an impossible value is an error whichever optimizer is active) but do not affect training.
    name: Literal["adam", "sgd"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)  # L2 penalty added to the gradient (both optimizers)
    betas: tuple[float, float]  # adam only
    eps: float = Field(gt=0)  # adam only
    momentum: float = Field(ge=0, lt=1)  # sgd only; 1 or more never decays the velocity
    nesterov: bool  # sgd only
    # 1-D parameters (biases, BatchNorm shifts) train at lr x this, with weight decay / this (the same decay per step).
    bias_lr_factor: float = Field(gt=0, default=1.0)
    whiten_bias_epochs: int = Field(ge=0, default=0)  # airnet: the optimizer trains its whitening bias this many epochs

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_list(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v  # YAML has lists, not tuples

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be >= 0 and < 1")
        return v

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerParams:
        if self.nesterov and self.momentum == 0:  # torch.optim.SGD refuses it too, but only once training starts
            raise _KeyProblem("nesterov", self.nesterov, "Nesterov momentum needs train.optimizer.momentum > 0 "
                                                          f"(it is {self.momentum})")
        return self


class SchedulerParams(_Strict):
    # none: the lr stays constant (after any warm-up); linear: per step, a warm-up over warmup_fraction of
    # all steps from lr * warmup_start_factor, then a straight line down to lr * end_factor at the last step
    name: Literal["plateau", "none", "linear"]
    mode: Literal["max", "min"]  # plateau only; "max": stepped on validation accuracy
    patience: int = Field(ge=0)  # plateau only
    threshold: float = Field(ge=0)  # plateau only
    factor: float = Field(gt=0, lt=1)  # plateau only
    warmup_epochs: int = Field(ge=0)  # linear warm-up over the first N epochs; 0: off
    warmup_start_factor: float = Field(gt=0, le=1)  # the first epoch (linear: step) trains at lr * this
    warmup_fraction: float = Field(ge=0, lt=1, default=0.0)  # linear only
    end_factor: float = Field(ge=0, le=1, default=1.0)  # linear only

    @model_validator(mode="after")
    def _one_warmup(self) -> SchedulerParams:
        if self.name == "linear" and self.warmup_epochs:
            raise _KeyProblem("warmup_epochs", self.warmup_epochs, "must be 0 with the per-step schedule "
                              "train.scheduler.name = linear (its warm-up is train.scheduler.warmup_fraction)")
        return self


class AugmentParams(_Strict):
    enabled: bool
    crop_padding: int = Field(ge=0, le=16)  # pixels of padding before the random 32x32 crop
    flip: bool
    padding_mode: Literal["zeros", "reflect"] = "zeros"  # reflect: the padding mirrors the image's edge
    # alternating: each image is flipped in every other epoch, starting from a random first choice
    flip_mode: Literal["random", "alternating"] = "random"


class LookaheadParams(_Strict):
    every: int = Field(ge=0, default=0)  # steps between updates of the slow weights; 0: off
    # The update after step t of T keeps decay^every x (t/T)^power of the slow weights, the rest from the fast ones.
    decay: float = Field(ge=0, lt=1, default=0.95)
    power: float = Field(ge=0, default=3.0)


class EarlyStoppingParams(_Strict):
    # Lightning's EarlyStopping on validation accuracy: an epoch improves when it beats the best
    # improving epoch so far by more than min_delta; `patience` epochs in a row without one stop training.
    patience: int = Field(ge=0, default=0)  # 0: off
    min_delta: float = Field(ge=0, lt=1, default=0.0)  # accuracy, 0..1 units


class TrainParams(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = Field(ge=0, le=SEED_MAX)
    device: Literal["auto", "cuda", "mps", "cpu"]
    # Processes per node (torchrun's --nproc_per_node): one per GPU, or several CPU processes with gloo.
    # batch_size stays the batch of all processes together. le=64: no node has more GPUs.
    nproc_per_node: int = Field(ge=1, le=64)
    log_every: int = Field(ge=0)  # print the running loss every N batches; 0 turns it off
    loader: Literal["device", "device_epoch", "dataloader"]  # device_epoch: each epoch augmented at once
    num_workers: int = Field(ge=0)  # only for loader=dataloader
    drop_last: bool  # no tiny last batch: its full optimizer step would land right before validation
    augment: AugmentParams
    label_smoothing: float = Field(ge=0, lt=1)
    amp: bool  # bf16 autocast, CUDA only
    channels_last: bool  # NHWC weights, CUDA and CPU
    compile: bool
    deterministic: bool
    optimizer: OptimizerParams
    scheduler: SchedulerParams
    lookahead: LookaheadParams = LookaheadParams()
    # Steps run before training and then undone bitwise: cuDNN's autotuning and CUDA's start-up (and
    # the graph's capture) are paid there, outside the epochs' time.
    kernel_warmup_steps: int = Field(ge=0, le=100, default=0)
    cuda_graph: bool = False  # replay the training step as one CUDA graph (elsewhere: the same static-buffer step)
    early_stopping: EarlyStoppingParams = EarlyStoppingParams()

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        # At least one epoch after the warm-up trains at the full lr (and gives the plateau scheduler
        # its first step); a warm-up as long as training never reaches the configured lr.
        if self.scheduler.warmup_epochs >= self.epochs:
            raise _KeyProblem("scheduler.warmup_epochs", self.scheduler.warmup_epochs,
                              f"must be less than train.epochs ({self.epochs})")
        a = self.augment
        if self.loader == "dataloader" and (a.padding_mode, a.flip_mode) != ("zeros", "random"):
            raise _KeyProblem("loader", self.loader, "the DataLoader path has zero padding and random flips only; "
                              "train.augment.padding_mode reflect and flip_mode alternating need loader device")
        if self.optimizer.whiten_bias_epochs and self.scheduler.name != "linear":
            raise _KeyProblem("optimizer.whiten_bias_epochs", self.optimizer.whiten_bias_epochs,
                              "needs the per-step schedule (train.scheduler.name = linear), whose rate table stops it")
        return self

    @model_validator(mode="after")
    def _graph_can_be_captured(self) -> TrainParams:
        # A captured graph replays fixed shapes and reads every changing value from the device.
        needs = {"scheduler.name": (self.scheduler.name, "linear", "the rates are read from a table on the device"),
                 "optimizer.name": (self.optimizer.name, "sgd", "fused SGD takes its rate as a device tensor"),
                 "drop_last": (self.drop_last, True, "every batch has the same shape"),
                 "nproc_per_node": (self.nproc_per_node, 1, "one process first"),
                 "compile": (self.compile, False, "one way of fusing the step at a time")}
        if not self.cuda_graph:
            return self
        for key, (value, wanted, why) in needs.items():
            if value != wanted:
                raise _KeyProblem(key, value, f"train.cuda_graph needs {wanted!r} here: {why}")
        if not self.kernel_warmup_steps:
            raise _KeyProblem("kernel_warmup_steps", 0, "train.cuda_graph needs at least 1: a graph is captured "
                              "after warm-up steps have created the optimizer state and tuned the kernels")
        return self


class EvaluateParams(_Strict):
    batch_size: int = Field(ge=1)
    tta_flip: bool  # average the logits of each image and its mirror
    # The weights outputs/model.pt holds, evaluate scores and MLflow logs: the epoch of the highest
    # validation accuracy (best) or the last epoch trained (last).
    weights: Literal["best", "last"] = "best"


# A registered model's name becomes part of `models:/<name>/<version>` URIs and, in a file
# store, a folder name: MLflow rejects "/" and ":" (any store), "\\" and "%" (file store), names
# that normalize to another path (".", ".."), and more than 256 characters (SQL column).
_MODEL_NAME_FORBIDDEN = set("/:\\%")


class TrackingParams(_Strict):
    experiment: str = Field(min_length=1)
    # Also write the per-epoch scalars as TensorBoard event files, outputs/tensorboard/<run>/.
    tensorboard: bool = False
    system_metrics: bool  # MLflow's CPU, memory, disk (and GPU) metrics of the training run
    registered_model: str  # each finished run registers a version of this model; "" = off

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not v:
            return v
        bad = sorted(_MODEL_NAME_FORBIDDEN & set(v))
        if bad:
            raise ValueError(f"a registered model name cannot contain {' '.join(repr(c) for c in bad)}")
        if not v.strip() or v.strip(".") == "" or v.startswith(".."):
            raise ValueError("not a usable registered model name (blank, or a path such as '..')")
        if len(v) > 256:
            raise ValueError("at most 256 characters")
        return v


class Params(_Strict):
    # A named recipe: recipes/<name>.yaml beside params.yaml, whose values replace params.yaml's
    # (see load_params). Everything below is then the effective value, the one in force.
    recipe: str = Field(min_length=1)
    data: DataParams
    split: SplitParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _one_tta(self) -> Params:
        if self.evaluate.tta_flip and self.model.tta != "none":
            raise _KeyProblem("evaluate.tta_flip", True, f"model.tta = {self.model.tta} already averages views, "
                              "mirror images included: set evaluate.tta_flip false")
        return self


def describe_error(err: dict[str, Any], source: str) -> str:
    """One line for one of pydantic's errors in the file `source`, naming the key (and its value)."""
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    if err["type"] == "missing":
        return f"{source}: missing key {key!r}"
    problem = err.get("ctx", {}).get("error")
    if isinstance(problem, _KeyProblem):  # at the top level (no section) the key is already whole
        return f"{source}: {f'{key}.' if key else ''}{problem.key} = {problem.value!r}: {problem.message}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {key} = {err.get('input')!r}: {msg}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise UserError naming every bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise UserError("\n".join(describe_error(err, source) for err in e.errors())) from None


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` is a string; DVC (ruamel, YAML 1.2) reads it as a float.
    Resolve floats the YAML 1.2 way so `lr: 3e-4` means the same to us as to `dvc exp run -S`."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"
               r"|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml_text(text: str, source: str) -> Any:
    """params.yaml's text (e.g. from `git show`) read the way `load_params` reads the file."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None


RECIPES_DIR = "recipes"  # beside params.yaml: recipes/<name>.yaml
# What a recipe may set: the training and evaluation settings. Not data or split (their stages
# would not rerun for a recipe), not tracking, not `recipe` itself.
_RECIPE_SECTIONS = ("model", "train", "evaluate")


# The course's recipe is params.yaml's own values: it needs no file (a params.yaml copied alone
# still loads); recipes/course.yaml only documents it.
BASE_RECIPE = "course"


def recipe_names(recipes_dir: Path) -> list[str]:
    return sorted({BASE_RECIPE, *(p.stem for p in recipes_dir.glob("*.yaml"))})


def read_recipe(name: str, recipes_dir: Path) -> dict[str, Any]:
    """The flattened values of recipes/<name>.yaml ({"train.batch_size": 128, ...}), checked for
    shape (a mapping of model/train/evaluate sections); an unknown name lists the valid ones."""
    names = recipe_names(recipes_dir)
    if name not in names:  # also keeps the name from being a path ("../x")
        raise UserError(f"recipe = {name!r}: no such recipe; valid: {', '.join(names)} ({recipes_dir}/NAME.yaml)")
    source = f"{RECIPES_DIR}/{name}.yaml"
    try:
        raw = yaml.load((recipes_dir / f"{name}.yaml").read_text(), Loader=_Yaml12Loader)
    except FileNotFoundError:  # only the base recipe gets here (recipe_names lists existing files)
        return {}
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None
    raw = raw or {}  # an empty recipe (the course's) changes nothing
    if not isinstance(raw, dict) or not set(raw) <= set(_RECIPE_SECTIONS):
        raise UserError(f"{source}: a recipe is a mapping of the sections {', '.join(_RECIPE_SECTIONS)}; "
                        f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    return flatten_mapping(raw)


def apply_recipe(raw: dict[str, Any], name: str, recipes_dir: Path) -> dict[str, Any]:
    """params.yaml's mapping with recipes/<name>.yaml's values in place of its own (a new dict)."""
    merged = copy.deepcopy(raw)
    merged["recipe"] = name
    for key, value in read_recipe(name, recipes_dir).items():
        if not set_dotted(merged, key, value):
            raise UserError(f"{RECIPES_DIR}/{name}.yaml: unknown key {key!r} (a recipe sets keys params.yaml has)")
    return merged


def load_params(path: str | Path = "params.yaml", recipe: str | None = None) -> Params:
    """params.yaml, validated, with its recipe applied: the effective values every stage uses.

    `recipe` (e.g. a benchmark's --recipe) replaces params.yaml's `recipe` key. The recipe's file,
    recipes/<name>.yaml beside params.yaml, sets values that replace params.yaml's; params.yaml
    is validated on its own first, so each error names the file it is in.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Loader)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    params = parse_params(raw, str(path))
    name = recipe if recipe is not None else params.recipe
    try:
        merged = apply_recipe(raw, name, path.parent / RECIPES_DIR)
    except UserError as e:
        raise UserError(f"{path}: {e}" if str(e).startswith("recipe =") else str(e)) from None
    return parse_params(merged, f"{RECIPES_DIR}/{name}.yaml")


def recipe_changes(path: str | Path = "params.yaml", recipe: str | None = None) -> dict[str, tuple[Any, Any]]:
    """{key: (params.yaml's value, the recipe's)} for the keys the recipe changes: what a stage prints."""
    path = Path(path)
    own = flatten(parse_params(read_yaml_text(path.read_text(), str(path)), str(path)))
    effective = flatten(load_params(path, recipe))
    return {k: (own[k], v) for k, v in effective.items() if k != "recipe" and own[k] != v}


# Sections whose values in force a recipe can make differ from params.yaml's (see _RECIPE_SECTIONS).
IN_FORCE_SECTIONS = ("recipe", *_RECIPE_SECTIONS)


def params_in_force_text(params: Params) -> str:
    """The train stage's outputs/params_in_force.yaml: `recipe` and the model, train and evaluate
    values in force (the recipe applied), as YAML. dvc.yaml lists it as a params file of evaluate,
    so `dvc exp show` and `dvc params diff` show these values beside params.yaml's, which under a
    recipe are not the ones that trained (recipes/fast.yaml's batch 256 while params.yaml says 64)."""
    values = params.model_dump(mode="json", include=set(IN_FORCE_SECTIONS))
    return ("# Written by the train stage: the values in force (params.yaml with recipes/<recipe>.yaml applied).\n"
            "# `dvc exp show` / `dvc params diff` list them as outputs/params_in_force.yaml:<key>. Do not edit.\n"
            + yaml.safe_dump({k: values[k] for k in IN_FORCE_SECTIONS}, sort_keys=False))


def flatten(params: Params) -> dict[str, Any]:
    """{"train.optimizer.lr": 0.001, ...}: the dotted names MLflow logs."""
    return flatten_mapping(params.model_dump())


def with_overrides(params: Params, overrides: list[str], source: str = "override") -> Params:
    """`params` with `dotted.key=value` overrides applied, like `dvc exp run -S`, then validated again.

    Values are read as YAML 1.2 (`3e-3` is a float, `[0.9, 0.99]` a list); a key that is not in
    params.yaml is an error naming it, not a new key.
    """
    raw = params.model_dump()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"{source}: {item!r}: expected KEY=VALUE, e.g. train.optimizer.lr=3e-4")
        if not set_dotted(raw, key, yaml.load(text, Loader=_Yaml12Loader)):
            raise UserError(f"{source}: unknown key {key!r}")
    return parse_params(raw, source)
