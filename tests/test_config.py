"""params.yaml is validated before any work: every mistake names its key and value."""
from __future__ import annotations

import pytest
import yaml

from conftest import REPO, run, set_params, stage_cmd
from cifarpipe.config import UserError, flatten, load_params, parse_params, with_overrides


def real_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_real_params_file_is_valid_and_keeps_the_course_recipe():
    p = load_params(REPO / "params.yaml")
    assert (p.split.val_fraction, p.split.seed) == (0.15, 2025)
    assert p.data.md5 == "c58f30108f718f92721af3b95e74349a"
    assert p.data.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    o, s = p.train.optimizer, p.train.scheduler
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("adam", 1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert (o.momentum, o.nesterov) == (0.9, False)  # the course's basic loop, when name is sgd
    assert (s.name, s.mode, s.patience, s.threshold, s.factor) == ("plateau", "max", 3, 1e-4, 0.1)
    assert s.warmup_epochs == 0  # no warm-up unless asked for
    assert p.train.early_stopping.patience == 0  # off: every epoch of the recipe trains
    assert p.evaluate.weights == "best"  # the model is the epoch validation picked


@pytest.mark.parametrize("key, value, message", [
    ("split.val_fraction", 1.5, "split.val_fraction = 1.5: Input should be less than 1"),
    ("split.val_fraction", 0, "split.val_fraction = 0: Input should be greater than 0"),
    ("data.md5", "not-a-checksum", "data.md5 = 'not-a-checksum': must be 32 lowercase hex digits"),
    ("data.url", "ftp://example.org/c.tgz", "data.url = 'ftp://example.org/c.tgz': unsupported URL scheme 'ftp'"),
    ("train.epochs", "10", "train.epochs = '10': Input should be a valid integer"),
    ("train.optimizer.lr", -1.0, "train.optimizer.lr = -1.0: Input should be greater than 0"),
    ("train.optimizer.betas", [0.9, 1.5], "train.optimizer.betas = [0.9, 1.5]: each beta must be >= 0 and < 1"),
    ("train.augment.flip", "yes", "train.augment.flip = 'yes': Input should be a valid boolean"),
    ("model.name", "vgg", "model.name = 'vgg': Input should be 'course_cnn', 'cifar_resnet' or 'airnet'"),
    ("model.tta", "mirror", "model.tta = 'mirror': Input should be 'none', 'flip' or 'flip_translate'"),
    ("train.augment.padding_mode", "edge", "train.augment.padding_mode = 'edge': Input should be 'zeros' or 'reflect'"),
    ("train.optimizer.bias_lr_factor", 0, "train.optimizer.bias_lr_factor = 0: Input should be greater than 0"),
    ("train.lookahead.decay", 1.0, "train.lookahead.decay = 1.0: Input should be less than 1"),
    ("train.cuda_graph", "on", "train.cuda_graph = 'on': Input should be a valid boolean"),
    ("train.optimizer.name", "rmsprop", "train.optimizer.name = 'rmsprop': Input should be 'adam' or 'sgd'"),
    ("train.optimizer.momentum", -0.1, "train.optimizer.momentum = -0.1: Input should be greater than or equal to 0"),
    ("train.optimizer.momentum", 1.0, "train.optimizer.momentum = 1.0: Input should be less than 1"),
    ("train.optimizer.nesterov", "yes", "train.optimizer.nesterov = 'yes': Input should be a valid boolean"),
    ("train.scheduler.name", "cosine",
     "train.scheduler.name = 'cosine': Input should be 'plateau', 'none' or 'linear'"),
    ("train.scheduler.warmup_epochs", -1,
     "train.scheduler.warmup_epochs = -1: Input should be greater than or equal to 0"),
    ("train.scheduler.warmup_epochs", 10, "train.scheduler.warmup_epochs = 10: must be less than train.epochs (10)"),
    # torch's CPU generator keeps a seed's low 32 bits: 2**32 would train as seed 0 (see test_loader.py)
    ("train.seed", 2**32, "train.seed = 4294967296: Input should be less than or equal to 4294967295"),
    ("train.seed", 2**45, "train.seed = 35184372088832: Input should be less than or equal to 4294967295"),
    ("split.seed", 2**32, "split.seed = 4294967296: Input should be less than or equal to 4294967295"),
    ("train.scheduler.warmup_start_factor", 0.0,
     "train.scheduler.warmup_start_factor = 0.0: Input should be greater than 0"),
    ("train.scheduler.warmup_start_factor", 1.5,
     "train.scheduler.warmup_start_factor = 1.5: Input should be less than or equal to 1"),
    ("evaluate.weights", "worst", "evaluate.weights = 'worst': Input should be 'best' or 'last'"),
    ("train.early_stopping.patience", -1,
     "train.early_stopping.patience = -1: Input should be greater than or equal to 0"),
    ("train.early_stopping.patience", 2.5, "train.early_stopping.patience = 2.5: Input should be a valid integer"),
    ("train.early_stopping.min_delta", -0.01,
     "train.early_stopping.min_delta = -0.01: Input should be greater than or equal to 0"),
    ("train.early_stopping.min_delta", 1.0, "train.early_stopping.min_delta = 1.0: Input should be less than 1"),
])
def test_bad_values_are_rejected_naming_key_and_value(key, value, message):
    raw = real_params()
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(UserError) as e:
        parse_params(raw)
    assert message in str(e.value)


def test_impossible_optimizer_combinations_are_named_at_their_key():
    base = load_params(REPO / "params.yaml")
    with pytest.raises(UserError) as e:  # torch.optim.SGD would only refuse it once training starts
        with_overrides(base, ["train.optimizer.name=sgd", "train.optimizer.momentum=0", "train.optimizer.nesterov=true"])
    assert str(e.value) == ("override: train.optimizer.nesterov = True: "
                            "Nesterov momentum needs train.optimizer.momentum > 0 (it is 0.0)")
    p = with_overrides(base, ["train.optimizer.name=sgd", "train.optimizer.momentum=0"])  # plain SGD is fine
    assert (p.train.optimizer.name, p.train.optimizer.momentum) == ("sgd", 0.0)
    # A warm-up that fills training: the error names the warm-up key, not the whole train section.
    with pytest.raises(UserError) as e:
        with_overrides(base, ["train.epochs=3", "train.scheduler.warmup_epochs=3"])
    assert str(e.value) == "override: train.scheduler.warmup_epochs = 3: must be less than train.epochs (3)"
    p = with_overrides(base, ["train.epochs=3", "train.scheduler.warmup_epochs=2", "train.scheduler.warmup_start_factor=1"])
    assert (p.train.scheduler.warmup_epochs, p.train.scheduler.warmup_start_factor) == (2, 1.0)


@pytest.mark.parametrize("overrides, message", [
    (["train.scheduler.name=linear", "train.scheduler.warmup_epochs=2"],
     "train.scheduler.warmup_epochs = 2: must be 0 with the per-step schedule"),
    (["train.optimizer.whiten_bias_epochs=3"],
     "train.optimizer.whiten_bias_epochs = 3: needs the per-step schedule (train.scheduler.name = linear)"),
    (["train.loader=dataloader", "train.augment.flip_mode=alternating"],
     "train.loader = 'dataloader': the DataLoader path has zero padding and random flips only"),
    (["train.cuda_graph=true"], "train.scheduler.name = 'plateau': train.cuda_graph needs 'linear' here"),
    (["train.cuda_graph=true", "train.scheduler.name=linear"],
     "train.optimizer.name = 'adam': train.cuda_graph needs 'sgd' here"),
    (["train.cuda_graph=true", "train.scheduler.name=linear", "train.optimizer.name=sgd", "train.drop_last=false"],
     "train.drop_last = False: train.cuda_graph needs True here: every batch has the same shape"),
    (["train.cuda_graph=true", "train.scheduler.name=linear", "train.optimizer.name=sgd", "train.nproc_per_node=2"],
     "train.nproc_per_node = 2: train.cuda_graph needs 1 here"),
    (["train.cuda_graph=true", "train.scheduler.name=linear", "train.optimizer.name=sgd"],
     "train.kernel_warmup_steps = 0: train.cuda_graph needs at least 1"),
    (["model.tta=flip", "evaluate.tta_flip=true"],
     "evaluate.tta_flip = True: model.tta = flip already averages views, mirror images included"),
])
def test_settings_that_cannot_go_together_are_named_at_their_key_before_any_work(overrides, message):
    base = load_params(REPO / "params.yaml")
    with pytest.raises(UserError) as e:
        with_overrides(base, overrides)
    assert str(e.value).startswith(f"override: {message}"), str(e.value)


def test_the_airbench_kind_of_recipe_is_valid_and_its_graph_variant_too():
    air = load_params(REPO / "params.yaml", recipe="air")
    assert (air.model.name, air.train.scheduler.name, air.train.cuda_graph) == ("airnet", "linear", False)
    assert with_overrides(air, ["train.cuda_graph=true"]).train.cuda_graph


def test_unknown_and_missing_keys_are_named():
    raw = real_params()
    raw["train"]["lrr"] = 0.1
    raw["train"]["early_stopping"]["monitor"] = "val_loss"
    del raw["split"]["seed"]
    with pytest.raises(UserError) as e:
        parse_params(raw)
    assert "unknown key 'train.lrr'" in str(e.value)
    assert "unknown key 'train.early_stopping.monitor'" in str(e.value)
    assert "missing key 'split.seed'" in str(e.value)


def test_yaml_1_2_floats_are_numbers(tmp_path):
    # PyYAML alone reads `3e-4` as a string; DVC (YAML 1.2) writes and reads it as a float.
    text = (REPO / "params.yaml").read_text().replace("lr: 0.001", "lr: 3e-4")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.optimizer.lr == 3e-4


def test_flatten_uses_dotted_names():
    flat = flatten(load_params(REPO / "params.yaml"))
    assert flat["train.optimizer.lr"] == 1e-3
    assert flat["train.optimizer.betas"] == [0.9, 0.999]
    assert (flat["train.optimizer.name"], flat["train.optimizer.momentum"], flat["train.optimizer.nesterov"]) == \
        ("adam", 0.9, False)
    assert (flat["train.scheduler.name"], flat["train.scheduler.warmup_epochs"],
            flat["train.scheduler.warmup_start_factor"]) == ("plateau", 0, 0.1)
    assert flat["split.seed"] == 2025


def test_a_stage_with_bad_params_stops_before_any_work_without_traceback(project):
    set_params(project, **{"split.val_fraction": 2.0})
    proc = run(stage_cmd(project, "download"), project, check=False)
    assert proc.returncode == 2
    assert "error: params.yaml: split.val_fraction = 2.0: Input should be less than 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project / "data").exists()  # nothing downloaded, nothing written


def test_overrides_apply_like_dvc_exp_run_set_and_are_validated():
    base = load_params(REPO / "params.yaml")
    p = with_overrides(base, ["train.optimizer.lr=3e-3", "train.batch_size=128", "train.augment.flip=false"])
    assert (p.train.optimizer.lr, p.train.batch_size, p.train.augment.flip) == (3e-3, 128, False)
    assert p.train.epochs == base.train.epochs  # everything else untouched
    with pytest.raises(UserError, match="unknown key 'train.optimizer.lrr'"):
        with_overrides(base, ["train.optimizer.lrr=1"])
    with pytest.raises(UserError, match="train.batch_size = 0: Input should be greater than or equal to 1"):
        with_overrides(base, ["train.batch_size=0"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        with_overrides(base, ["train.batch_size"])
