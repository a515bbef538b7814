"""The training step of the air recipe on the CPU: no host sync, few ops, the graphed form equal to
the eager one, the warm-up undone, the per-step rates and Lookahead, and an exact resume."""
from __future__ import annotations

import copy

import pytest
import torch

from cifarpipe.config import LookaheadParams, load_params, with_overrides
from cifarpipe.data.batches import EpochBatches, whitening_images
from cifarpipe.training import checkpoint, engine
from cifarpipe.training.opcount import OpCounter
from cifarpipe.training.optim import linear_rates
from cifarpipe.training.step import GraphedStep, warm_up

from conftest import REPO

CPU = torch.device("cpu")
# The air recipe shrunk: 8 steps of 16 images per epoch, 3 epochs, Lookahead every 5 steps (so
# updates land inside an epoch, at step 10 and 15, and after the last step, 24).
SMALL = ["model.width=8", "train.batch_size=16", "train.epochs=3", "train.optimizer.whiten_bias_epochs=1"]
# The most aten operators one eager step of the air recipe may launch on the CPU: 97.8 measured
# (forward ~30, backward ~45, 3 fused SGD updates, 2 rate ops, 7 metric ops, Lookahead 4 in 5
# steps; CUDA adds bf16 autocast's ~17 casts). A regression that puts index arithmetic, extra
# casts or metric kernels back into the step shows here.
MAX_LAUNCHES = 105


def air_params(*extra: str):
    return with_overrides(load_params(REPO / "params.yaml", recipe="air"), [*SMALL, *extra])


def air_data(n: int = 130, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def air_setup(params, images):
    p = params.train
    batches = EpochBatches(images, torch.arange(len(images)) % 10, p.batch_size, [0.5] * 3, [0.25] * 3, p.augment,
                           seed=p.seed, drop_last=True)
    setup = engine.build_training(params.model, p, CPU, steps_per_epoch=len(batches),
                                  init_images=whitening_images(images, [0.5] * 3, [0.25] * 3))
    return setup, batches


def train_steps(setup, batches, epochs: range, stop_at: tuple[int, int] | None = None):
    """Run the steps of `epochs` as fit does; stop after (epoch, step) if given."""
    for epoch in epochs:
        setup.step.begin(0.0, 0)
        for i, (x, y) in enumerate(batches.epoch(epoch), start=1):
            setup.step(x, y)
            if stop_at == (epoch, i):
                return


def weights(setup) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in setup.model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_an_eager_step_makes_no_host_sync_and_launches_a_bounded_number_of_ops():
    params = air_params()
    images, _ = air_data()
    setup, batches = air_setup(params, images)
    x, y = next(iter(batches.epoch(0)))
    setup.step.begin(0.0, 0)
    setup.step(x, y)  # the first step creates the optimizer state: count a later one
    with OpCounter() as ops:
        for _ in range(5):
            setup.step(x, y)  # the fifth runs Lookahead
    assert ops.syncs == [], ops.syncs
    assert ops.launches / 5 <= MAX_LAUNCHES, ops.summary(5)
    assert ops.counts["aten._fused_sgd_"] == 5 * 3  # one fused update per group: weights, biases, whitening bias
    assert ops.counts["aten._foreach_copy_"] == 1  # Lookahead, once in five steps
    # The loop's own reads happen once per epoch: a whole epoch through train_one_epoch syncs 2 times.
    with OpCounter() as epoch_ops:
        engine.train_one_epoch(setup.step_model, batches.epoch(1), setup.optimizer, setup.loss_fn, step=setup.step)
    assert epoch_ops.syncs == ["aten._local_scalar_dense"] * 2


def test_the_graphed_step_from_static_buffers_computes_exactly_what_the_eager_step_does():
    images, _ = air_data()
    eager, batches = air_setup(air_params(), images)
    graphed, _ = air_setup(air_params("train.cuda_graph=true"), images)
    assert isinstance(graphed.step, GraphedStep) and not isinstance(eager.step, GraphedStep)
    x, y = next(iter(batches.epoch(0)))
    warm_up(graphed.step, x, y, 2)  # makes the buffers (and on CUDA would capture)
    train_steps(eager, batches, range(3))
    train_steps(graphed, batches, range(3))
    assert_same(weights(eager), weights(graphed))
    assert eager.step.global_step == graphed.step.global_step == 24
    assert torch.equal(eager.step.loss_sum, graphed.step.loss_sum)
    # What stays on the host when the graph replays (forward_backward_update is the captured part):
    # the two copies into the buffers, and Lookahead's 4 multi-tensor ops every 5th step.
    graphed.step.forward_backward_update = lambda x, y: None  # stands for graph.replay()
    graphed.step.global_step = 0
    with OpCounter() as ops:
        for _ in range(5):
            graphed.step(x, y)
    assert (ops.launches, ops.syncs) == (2 * 5 + 4, [])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_kernel_warm_up_is_undone_bit_for_bit(optimizer):
    extra = [] if optimizer == "sgd" else ["train.optimizer.name=adam", "train.optimizer.lr=0.001"]
    images, _ = air_data()
    plain, batches = air_setup(air_params(*extra), images)
    warmed, _ = air_setup(air_params(*extra), images)
    x, y = next(iter(batches.epoch(2)))
    warm_up(warmed.step, x, y, 3)
    assert warmed.optimizer.state  # the state the warm-up created stays, as zeros
    train_steps(plain, batches, range(2))
    train_steps(warmed, batches, range(2))
    assert_same(weights(plain), weights(warmed))


def test_the_per_step_rates_warm_up_decay_and_stop_the_whitening_bias():
    params = air_params("train.lookahead.every=0")  # Lookahead would keep averaging the stopped bias
    images, _ = air_data()
    setup, _ = air_setup(params, images)
    groups = [g["name"] for g in setup.optimizer.param_groups]
    assert groups == ["weights", "biases", "whiten_bias"]
    table = linear_rates(setup.optimizer, params.train.scheduler, 24, {"whiten_bias": 8})
    lr = params.train.optimizer.lr
    warm = round(0.23 * 24)  # 6
    assert table[0, 0] == pytest.approx(lr * 0.2) and table[0, warm] == pytest.approx(lr)
    assert table[0, 23] == pytest.approx(lr * 0.07) and table[0, 24] == table[0, 23]
    assert torch.allclose(table[1], table[0] * 64)  # BatchNorm shifts at 64x the rate
    assert (table[2, :8] == table[0, :8]).all() and (table[2, 8:] == 0).all()
    assert setup.optimizer.param_groups[1]["weight_decay"] == pytest.approx(params.train.optimizer.weight_decay / 64)
    bias = setup.model.whiten.bias
    before = bias.detach().clone()
    images_b = EpochBatches(images, torch.arange(len(images)) % 10, 16, [0.5] * 3, [0.25] * 3, params.train.augment,
                            drop_last=True)
    train_steps(setup, images_b, range(1))
    after_one = bias.detach().clone()
    assert not torch.equal(before, after_one)  # trained in epoch 1 ...
    train_steps(setup, images_b, range(1, 3))
    assert torch.equal(bias.detach(), after_one)  # ... and not after (whiten_bias_epochs=1)
    assert float(setup.optimizer.param_groups[0]["lr"]) == pytest.approx(lr * 0.07)  # the last step's rate


def test_lookahead_pulls_the_slow_weights_and_leaves_the_model_on_them_after_the_last_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    from cifarpipe.training.lookahead import Lookahead
    la = Lookahead(model, LookaheadParams(every=5, decay=0.9, power=1.0), total_steps=12)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert [s for s in range(1, 13) if la.due(s)] == [5, 10, 12]
    la.update(10)
    kept = 0.9 ** 5 * (10 / 12)
    expected = start + (1 - kept) * 1.0
    assert torch.allclose(la.slow[0], expected) and torch.equal(model.weight.detach(), la.slow[0])


def test_a_checkpoint_in_the_middle_of_an_epoch_resumes_rates_lookahead_and_whitening_exactly(tmp_path):
    params = air_params()
    images, _ = air_data()
    whole, batches = air_setup(params, images)
    train_steps(whole, batches, range(3))

    first, _ = air_setup(params, images)
    train_steps(first, batches, range(3), stop_at=(1, 3))  # epoch 2, step 3: global step 11, after a Lookahead update
    state = engine.TrainState(epoch=1, progress=engine.EpochProgress(step=3))
    path = tmp_path / "last.pt"
    checkpoint.save(path, checkpoint.build(state, first, CPU, seed=0, run_id="r", fingerprint="f", model_name="airnet"))
    ckpt = checkpoint.load(path)
    assert ckpt["schedule_step"] == 11 and len(ckpt["lookahead_state_dict"]["slow"]) > 0
    assert "whiten.weight" in ckpt["model_state_dict"]

    torch.manual_seed(123)  # a fresh process: other random weights, other whitening images
    other_images, _ = air_data(seed=1)
    resumed, _ = air_setup(params, other_images)
    restored = checkpoint.restore(ckpt, resumed, CPU, mid_epoch=True)
    assert (restored.epoch, restored.progress.step, resumed.step.global_step) == (1, 3, 11)
    for epoch in (1, 2):
        resumed.step.begin(0.0, 0)
        for x, y in batches.epoch(epoch, 3 if epoch == 1 else 0):
            resumed.step(x, y)
    assert_same(weights(whole), weights(resumed))
    assert all(torch.equal(a, b) for a, b in zip(whole.step.lookahead.slow, resumed.step.lookahead.slow))
    # and the rates are the optimizer's again (restore re-links the table's tensors)
    assert resumed.optimizer.param_groups[0]["lr"].data_ptr() == resumed.step.rates.rates.data_ptr()


def test_without_the_new_settings_the_step_is_the_courses_loop():
    """The defaults build a plain eager step: no rates, no Lookahead, one group, float rates."""
    params = load_params(REPO / "params.yaml")
    setup = engine.build_training(params.model, params.train, CPU)
    assert type(setup.step).__name__ == "TrainStep" and setup.step.rates is None and setup.step.lookahead is None
    assert len(setup.optimizer.param_groups) == 1 and setup.optimizer.param_groups[0]["lr"] == 0.001
    copy.deepcopy(setup.optimizer.state_dict())  # plain values, as before
    assert setup.init_seconds == 0.0  # no whitening layer: the stage prints no whitening line, epoch 1 gets no time
