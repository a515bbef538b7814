"""The training loop and the models, on tiny data on the CPU."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cifarpipe.training import checkpoint, engine, optim
from cifarpipe.config import EarlyStoppingParams, ModelParams, OptimizerParams, SchedulerParams
from cifarpipe.training.models import build_model

ADAM = OptimizerParams(name="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.9,
                       nesterov=False)
PLATEAU = SchedulerParams(name="plateau", mode="max", patience=3, threshold=1e-4, factor=0.1, warmup_epochs=0,
                          warmup_start_factor=0.1)


def tiny_batches(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model(ModelParams(name="course_cnn", width=64))
    (x, y), = tiny_batches(16, 16)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = optim.make_optimizer(model, ADAM)
    before = loss_fn(model(x), y).item()
    engine.train_one_epoch(model, [(x, y)], opt, loss_fn)
    assert loss_fn(model(x), y).item() < before


def test_the_default_network_trains_a_few_steps_on_tiny_data():
    torch.manual_seed(0)
    model = build_model(ModelParams(name="cifar_resnet", width=16))
    batches = tiny_batches(32, 16)
    opt = optim.make_optimizer(model, ADAM)
    loss_fn = torch.nn.CrossEntropyLoss()
    first = engine.train_one_epoch(model, batches, opt, loss_fn)
    for _ in range(4):
        last = engine.train_one_epoch(model, batches, opt, loss_fn)
    assert last.loss < first.loss
    result = engine.evaluate(model, batches)
    assert result.predictions.shape == (32,) and 0 <= result.accuracy <= 1


def test_epoch_sums_count_every_image_and_should_stop_ends_at_a_safe_point():
    model = build_model(ModelParams(name="course_cnn", width=64))
    opt = optim.make_optimizer(model, ADAM)
    p = engine.train_one_epoch(model, tiny_batches(64, 16), opt, torch.nn.CrossEntropyLoss())
    assert (p.step, p.seen) == (4, 64) and 0 <= p.accuracy <= 1
    stopped = engine.train_one_epoch(model, tiny_batches(64, 16), opt, torch.nn.CrossEntropyLoss(),
                                     should_stop=lambda: True)
    assert (stopped.step, stopped.seen) == (1, 16)


def test_running_loss_is_printed_every_n_batches():
    model = build_model(ModelParams(name="course_cnn", width=64))
    lines = []
    engine.train_one_epoch(model, tiny_batches(64, 8), optim.make_optimizer(model, ADAM),
                           torch.nn.CrossEntropyLoss(), log_every=4, log=lines.append)
    assert len(lines) == 2 and "running loss" in lines[0]


def test_checkpoint_dict_round_trips_with_weights_only_loading(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelParams(name="course_cnn", width=64))
    opt = optim.make_optimizer(model, ADAM)
    sched = optim.make_scheduler(opt, PLATEAU)
    engine.train_one_epoch(model, tiny_batches(), opt, torch.nn.CrossEntropyLoss())
    sched.end_epoch(0, val_accuracy=0.5, val_loss=1.0)
    ckpt = {"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": sched.state_dict(), "loss": 1.5, "step": 0, "rng": checkpoint.rng_state(torch.device("cpu")),
            "history": [{"epoch": 1, "val_accuracy": 0.5}], "complete": False, "fingerprint": "abc"}
    checkpoint.save(tmp_path / "c.pt", ckpt)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # what a careful user would do
    assert loaded["epoch"] == 3 and loaded["loss"] == 1.5
    model2 = build_model(ModelParams(name="course_cnn", width=64))
    model2.load_state_dict(loaded["model_state_dict"])
    opt2 = optim.make_optimizer(model2, ADAM)
    opt2.load_state_dict(loaded["optimizer_state_dict"])
    sched2 = optim.make_scheduler(opt2, PLATEAU)
    sched2.load_state_dict(loaded["scheduler_state_dict"])
    assert sched2.plateau.best == 0.5
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_course_cnn_is_the_course_network():
    m = build_model(ModelParams(name="course_cnn", width=64))
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (3, 6, (5, 5))
    assert (m.conv2.out_channels, m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (16, 400, 120, 84)
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_bf16_autocast_only_where_the_gpu_has_it_natively(monkeypatch):
    # A V100 or T4: torch says bf16 is "supported" by emulation only.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert engine.amp_enabled(True, torch.device("cuda")) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert engine.amp_enabled(True, torch.device("cuda")) is True
    assert engine.amp_enabled(False, torch.device("cuda")) is False
    assert engine.amp_enabled(True, torch.device("cpu")) is False


def _pixel_logits_model() -> torch.nn.Module:
    """logit k = the red pixel at row 0, column k: a last Linear layer, which bf16 autocast runs in bf16."""
    head = torch.nn.Linear(3072, 10, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        for k in range(10):
            head.weight[k, k] = 1.0  # NCHW flattened: channel 0, row 0, column k is index k
    return torch.nn.Sequential(torch.nn.Flatten(), head)


@pytest.mark.skipif(not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="no CPU autocast")
def test_evaluate_averages_flips_and_takes_argmax_in_fp32_under_bf16_autocast():
    # Image: class 0 scores 1.0 on both views, class 1 scores 1.0 and 1.0078125 (the next bf16
    # after 1.0) on its mirror. Every value is exact in bf16; only their sum is not: 2.0078125
    # rounds to 2.0 in bf16, a tie that argmax gives to class 0. In fp32 class 1 wins.
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 1.0
    x[0, 0, 0, 31], x[0, 0, 0, 30] = 1.0, 1.0078125  # what columns 0 and 1 see in the mirror image
    y = torch.tensor([1])
    model = _pixel_logits_model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        views = [model(x), model(x.flip(3))]
    assert views[0].dtype == torch.bfloat16  # the setting is real: autocast gives bf16 logits
    expected = ((views[0].float() + views[1].float()) / 2).argmax(1)  # independent fp32 computation
    assert expected.tolist() == [1] and ((views[0] + views[1]) / 2).argmax(1).tolist() == [0]
    result = engine.evaluate(model, [(x, y)], amp=True, tta="flip")
    assert result.predictions.tolist() == [1] and result.accuracy == 1.0
    assert result.loss == pytest.approx(F.cross_entropy((views[0].float() + views[1].float()) / 2, y).item())


def test_the_reported_train_loss_is_plain_cross_entropy_while_smoothing_is_optimized():
    torch.manual_seed(0)
    model = build_model(ModelParams(name="course_cnn", width=64))
    (x, y), = tiny_batches(16, 16)
    smoothed_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.3)
    with torch.no_grad():
        model.fc3.weight.mul_(50)  # confident logits, where smoothing changes the loss a lot
    with torch.no_grad():  # independent computations, on the weights the step starts from
        plain, smoothed = F.cross_entropy(model(x), y).item(), smoothed_fn(model(x), y).item()
    assert abs(plain - smoothed) > 0.1  # the two definitions differ here: the test can tell them apart
    lines = []
    p = engine.train_one_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.0), smoothed_fn,
                               log_every=1, log=lines.append)
    assert p.loss == pytest.approx(plain, rel=1e-5)
    assert lines == [f"  batch     1: running loss {plain:.3f}"]
    # and the step followed the smoothed loss: its gradient, not plain cross-entropy's
    model.zero_grad()
    smoothed_fn(model(x), y).backward()
    smoothed_grad = model.fc3.weight.grad.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = model.fc3.weight.detach().clone()
    engine.train_one_epoch(model, [(x, y)], opt, smoothed_fn)
    torch.testing.assert_close(before - model.fc3.weight.detach(), smoothed_grad)


def test_sgd_is_the_optimizer_when_named_and_steps_exactly_like_torch_sgd():
    sgd = ADAM.model_copy(update={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3})
    torch.manual_seed(0)
    model = build_model(ModelParams(name="course_cnn", width=64))
    reference = copy.deepcopy(model)
    opt = optim.make_optimizer(model, sgd)
    assert type(opt) is torch.optim.SGD and opt.defaults["fused"]  # one kernel, as Adam on the CPU
    assert (opt.defaults["momentum"], opt.defaults["nesterov"], opt.defaults["weight_decay"]) == (0.9, True, 1e-3)
    # The same three steps (momentum matters from the second on) with torch's plain SGD of the course's values.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    engine.train_one_epoch(model, tiny_batches(48, 16), opt, loss_fn)
    engine.train_one_epoch(reference, tiny_batches(48, 16), ref_opt, loss_fn)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    adam = optim.make_optimizer(build_model(ModelParams(name="course_cnn", width=64)), ADAM)
    assert type(adam) is torch.optim.Adam and adam.defaults["fused"]


def _lrs(schedule: optim.EpochSchedule, val_accuracies: list[float]) -> list[float]:
    """The rate each epoch trains with, the stage's way: start_epoch, (training), validation, end_epoch."""
    lrs = []
    for epoch, acc in enumerate(val_accuracies):
        lrs.append(schedule.start_epoch(epoch))
        schedule.end_epoch(epoch, val_accuracy=acc, val_loss=1 - acc)
    return lrs


def test_warmup_rises_per_epoch_then_the_plateau_scheduler_starts_with_its_full_patience():
    model = build_model(ModelParams(name="course_cnn", width=64))
    opt = optim.make_optimizer(model, ADAM.model_copy(update={"lr": 0.01}))
    warm = PLATEAU.model_copy(update={"patience": 1, "threshold": 0.0, "warmup_epochs": 2, "warmup_start_factor": 0.25})
    # Validation accuracy falls during warm-up. Counted, epochs 1-3 would be two bad epochs after the
    # best (epoch 1) and cut the rate after epoch 3. Not counted, epoch 3 (0.30) is the plateau's
    # first value; epoch 4 improves it, 5 and 6 are its two bad epochs (patience 1): the cut comes after 6.
    lrs = _lrs(optim.make_scheduler(opt, warm), [0.50, 0.40, 0.30, 0.35, 0.34, 0.33, 0.32])
    assert lrs == pytest.approx([0.0025, 0.00625, 0.01, 0.01, 0.01, 0.01, 0.001], rel=1e-12)
    assert lrs[2] == 0.01  # the warm-up ends at the configured rate exactly
    # `none`: the warm-up, then the configured rate whatever validation says; nothing to checkpoint.
    opt = optim.make_optimizer(model, ADAM.model_copy(update={"lr": 0.01}))
    constant = optim.make_scheduler(opt, warm.model_copy(update={"name": "none"}))
    assert _lrs(constant, [0.5, 0.4, 0.3, 0.2]) == pytest.approx([0.0025, 0.00625, 0.01, 0.01], rel=1e-12)
    assert constant.state_dict() == {}
    # No warm-up: the course's plateau scheduler from the first epoch (patience 1: cut after epoch 3).
    opt = optim.make_optimizer(model, ADAM.model_copy(update={"lr": 0.01}))
    plain = optim.make_scheduler(opt, PLATEAU.model_copy(update={"patience": 1, "threshold": 0.0}))
    assert _lrs(plain, [0.5, 0.4, 0.3, 0.2]) == pytest.approx([0.01, 0.01, 0.01, 0.001], rel=1e-12)


def test_early_stopping_counts_like_lightning_on_validation_accuracy():
    # min_delta 0.01: epoch 3 (0.512) improves on 0.50, the best *improving* epoch, though not by
    # 0.01 on the running best 0.505; epochs 4 and 5 do not improve on 0.512 by 0.01: patience 2 stops at 5.
    rule = EarlyStoppingParams(patience=2, min_delta=0.01)
    state, counts = engine.TrainState(), []
    for accuracy in (0.50, 0.505, 0.512, 0.515, 0.52):
        assert not state.stopped_early
        engine.count_for_early_stopping(state, accuracy, rule)
        counts.append(state.epochs_without_improvement)
    assert counts == [0, 1, 0, 1, 2] and state.stopped_early and state.early_stopping_best == 0.512
    off = engine.TrainState()
    for accuracy in (0.5, 0.4, 0.3):
        engine.count_for_early_stopping(off, accuracy, EarlyStoppingParams(patience=0))
    assert (off.epochs_without_improvement, off.stopped_early) == (0, False)
