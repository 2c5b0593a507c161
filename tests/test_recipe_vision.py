"""The ``vision`` recipe: the digits data, the shift augmentation, the ResNet and its Task."""

from __future__ import annotations

import math

import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import get_recipe
from mixprec.recipes.vision import (BasicBlock, ResNet, accuracy, linear_decay, load_vision_data,
                                    shift_images, vision)
from mixprec.task import Task

TINY = get_recipe("vision").tiny


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return vision(**TINY)


# --------------------------------------------------------------------------- data


def test_data_shapes_split_and_standardization():
    train_x, train_y, val_x, val_y = load_vision_data(16)
    assert train_x.shape == (1437, 1, 16, 16) and val_x.shape == (360, 1, 16, 16)
    assert train_y.shape == (1437,) and val_y.shape == (360,)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.long
    assert sorted(set(train_y.tolist())) == list(range(10)) == sorted(set(val_y.tolist()))
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-4
    # Deterministic beyond the cache.
    from mixprec.recipes import vision as vision_module

    vision_module._load.cache_clear()
    again = load_vision_data(16)
    assert torch.equal(again[0], train_x) and torch.equal(again[3], val_y)


def test_shift_images_moves_each_image_by_its_own_offset():
    images = torch.zeros(3, 1, 6, 6)
    images[:, 0, 2, 3] = 1.0  # one bright pixel at (row 2, col 3)
    gen = torch.Generator().manual_seed(0)
    shifted = shift_images(images, 2, gen, fill=-1.0)
    d = torch.randint(-2, 3, (3, 2), generator=torch.Generator().manual_seed(0))  # the same draw
    for i in range(3):
        dy, dx = d[i].tolist()
        assert shifted[i, 0, 2 + dy, 3 + dx] == 1.0
        assert int((shifted[i] == 1.0).sum()) == 1
        # Rows/columns shifted in from outside carry the fill value.
        if dy > 0:
            assert (shifted[i, 0, :dy] == -1.0).all()
        if dx < 0:
            assert (shifted[i, 0, :, dx:] == -1.0).all()
    assert shift_images(images, 0, gen) is images


def test_train_batches_deterministic_per_seed_and_leave_global_rng_alone(tiny_task):
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def take(seed, n=4):
        it = tiny_task.train_batches(seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert torch.equal(torch.get_rng_state(), state)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])
    x, y = a[0]
    assert x.shape == (TINY["batch_size"], 1, TINY["image_size"], TINY["image_size"])
    assert y.shape == (TINY["batch_size"],) and y.dtype == torch.long


# --------------------------------------------------------------------------- model and metric


def test_resnet_structure_and_forward():
    torch.manual_seed(0)
    model = ResNet(width=8, stage_blocks=(1, 2))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 1 + 3 * 2 + 1
    assert isinstance(blocks[0].shortcut, torch.nn.Identity)  # 8 -> 8, stride 1
    assert not isinstance(blocks[1].shortcut, torch.nn.Identity)  # 8 -> 16, stride 2
    assert model.stem[0].stride == (2, 2) and blocks[1].conv1.stride == (2, 2)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    recipe_model = vision(**TINY).build_model()
    assert all(m.momentum == 0.3 for m in recipe_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(4, 1, 16, 16)
    assert model(x).shape == (4, 10)
    # A block is relu(residual branch + shortcut): with the branch's last BatchNorm at zero
    # an identity block returns relu(x).
    with torch.no_grad():
        blocks[0].bn2.weight.zero_()
        blocks[0].bn2.bias.zero_()
        h = torch.randn(2, 8, 8, 8)
        torch.testing.assert_close(blocks[0](h), torch.relu(h))


def test_accuracy_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.5]])
    assert float(accuracy(logits, torch.tensor([0, 1, 2, 0]))) == 1.0
    assert float(accuracy(logits, torch.tensor([1, 2, 0, 1]))) == 0.0
    assert float(accuracy(logits, torch.tensor([0, 1, 0, 2]))) == 0.5
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, torch.tensor([0, 1]))


def test_loss_is_fp32_under_bf16_autocast(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    batch = next(tiny_task.train_batches(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(10)) < 0.1  # near-uniform predictions at init


# --------------------------------------------------------------------------- lr schedule


def _lrs_over(optimizer, n):
    p = optimizer.param_groups[0]["params"][0]
    seen = []
    for _ in range(n):
        p.grad = torch.ones_like(p)
        optimizer.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_linear_decay_schedule_values_and_floor():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = linear_decay(torch.optim.SGD([p], lr=1.0), decay_steps=4, min_fraction=0.1)
    # Step k (0-based) runs at lr 1 - k/4, floored at 0.1.
    assert _lrs_over(opt, 6) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.1, 0.1])
    # Each step moved p by its lr (SGD, gradient 1): the lr was set before the step.
    assert float(p.detach()[0]) == pytest.approx(-(1.0 + 0.75 + 0.5 + 0.25 + 0.1 + 0.1))


def test_linear_decay_resumes_from_the_state_dict():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = linear_decay(torch.optim.SGD([p], lr=1.0), decay_steps=4)
    _lrs_over(opt, 2)
    state = opt.state_dict()
    q = torch.nn.Parameter(torch.zeros(3))
    fresh = linear_decay(torch.optim.SGD([q], lr=1.0), decay_steps=4)
    fresh.load_state_dict(state)
    assert _lrs_over(fresh, 2) == pytest.approx([0.5, 0.25])


def test_recipe_schedule_resumes_bit_exactly_through_checkpoints(tmp_path):
    task = vision(**{**TINY, "decay_steps": 6})
    full = mixprec.train(task, "fp32", steps=8, seed=0, monitor_every=0)
    mixprec.train(task, "fp32", steps=4, seed=0, monitor_every=0, checkpoint_dir=tmp_path)
    resumed = mixprec.train(task, "fp32", steps=8, seed=0, monitor_every=0, checkpoint_dir=tmp_path,
                            resume=True)
    assert resumed["losses"] == full["losses"]
    assert resumed["eval"] == full["eval"]


# --------------------------------------------------------------------------- training and evaluation


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_training_lowers_the_loss_and_beats_chance(tiny_task, precision):
    result = mixprec.train(tiny_task, precision, steps=20, seed=0, monitor_every=0)
    losses = result["losses"]
    assert result["status"] == "completed" and all(math.isfinite(l) for l in losses)
    # Measured (fp32 and bf16, seeds 0-2): last-5 mean / first-5 mean about 0.3-0.5.
    assert _mean(losses[-5:]) < 0.75 * _mean(losses[:5]), losses
    assert result["eval"]["accuracy"] > 0.3  # chance is 0.1


def test_evaluate_keys_values_and_restores_mode(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    model.train()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"accuracy", "val_loss"}
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert all(m.training for m in model.modules())
    # The numbers are those of a plain evaluation loop over the validation set.
    _, _, val_x, val_y = load_vision_data(TINY["image_size"])
    model.eval()
    with torch.no_grad():  # the same batches as evaluate(), so the same kernels
        logits = torch.cat([model(x) for x in val_x.split(TINY["eval_batch_size"])])
    assert metrics["accuracy"] == pytest.approx(float(accuracy(logits, val_y)), abs=1e-6)  # an fp32 mean
    assert metrics["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, val_y)), rel=1e-5)
    assert tiny_task.evaluate(model) == metrics
    assert not any(m.training for m in model.modules())  # eval mode found, eval mode left


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(width=0), "0"),
        (dict(stage_blocks=()), "()"),
        (dict(stage_blocks=(1, 0)), "(1, 0)"),
        (dict(stage_blocks="11"), "'11'"),
        (dict(image_size=4), "4"),
        (dict(image_size=8, stage_blocks=(1, 1, 1, 1, 1)), "8"),
        (dict(batch_size=True), "True"),
        (dict(lr=-0.1), "-0.1"),
        (dict(lr=float("inf")), "inf"),
        (dict(weight_decay=-1.0), "-1.0"),
        (dict(shift=-1), "-1"),
        (dict(shift=40), "40"),
        (dict(eval_batch_size=2.0), "2.0"),
        (dict(bn_momentum=0.0), "0.0"),
        (dict(bn_momentum=1.5), "1.5"),
        (dict(decay_steps=-5), "-5"),
    ],
)
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        vision(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert next(iter(kwargs)) in message


def test_recipe_info():
    info = get_recipe("vision")
    assert info.factory is vision and info.metric_key == "accuracy" and info.higher_is_better
    assert info.expected_fp32 is not None and 0.1 < info.expected_fp32[0] < info.expected_fp32[1] <= 1.0
