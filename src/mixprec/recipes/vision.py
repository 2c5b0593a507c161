"""The ``vision`` recipe: a small ResNet with BatchNorm on scikit-learn's handwritten digits.

What it is
    A ResNet-style image classifier: a 3x3 conv stem (1 -> ``width`` channels, BatchNorm,
    ReLU) at full resolution, then ``len(stage_blocks)`` stages of BasicBlocks (two 3x3
    convs with BatchNorm2d and ReLU, identity shortcut, or a strided 1x1 conv + BatchNorm
    where the shape changes). Every stage after the first halves the resolution and doubles
    the channels. Global average pool, then a linear head to the 10 classes. He (fan-out)
    init for the convs; each block's last BatchNorm starts at gamma = 0, so every residual
    block starts as the identity (Goyal et al., 2017).

The data
    The 1,797 real 8x8 scans bundled with scikit-learn (:mod:`mixprec.recipes.digits`:
    1,437 training and 360 validation images, a fixed split), bilinearly upsampled to
    ``image_size`` x ``image_size`` once and cached, standardized with the training set's
    mean and std. Training batches are drawn with replacement from the training images by
    a ``torch.Generator`` seeded with the run's seed, and each image is shifted by a random
    whole number of pixels in ``[-shift, shift]`` on both axes (zero padding), drawn from
    the same generator. Validation images are not shifted. Chance is 10% accuracy
    (cross-entropy ln 10 = 2.30).

Expected numbers (fp32, defaults, seed 0; 2-core AMD EPYC with AVX512_BF16, torch 2.13,
scikit-learn digits)
    * loss 2.3 at step 1, mean of steps 81-100 about 0.10-0.12; ``evaluate`` then gives
      accuracy 0.97-0.98 on the 360 validation images (seeds 0-2: 0.975, 0.981, 0.975),
      val_loss 0.07-0.09.
    * one fp32 ``mixprec train vision`` (100 steps): about 20 s on a quiet machine, median
      step about 0.19 s; the convolutions are about 95 MFLOP per image forward (about 18
      GFLOP per step with the backward). bf16-mixed steps are about 1.5x faster
      (1.46x [1.44, 1.50] over 30 rounds in ``verify --all``, docs/results.md).
    * Numerics: the loss is cross-entropy on ``logits.float()``; BatchNorm runs as autocast
      leaves it (on CPU it computes its statistics in fp32 for bf16 inputs). Both
      ``mixprec verify vision --precision bf16-mixed --noise-floor`` and
      ``--precision emulate:fp16-mixed`` pass at the defaults with nothing kept in fp32.
    * after ``verify_steps`` = 200 steps (``mixprec verify --all``, docs/results.md):
      accuracy 0.997 (seed 0) and 0.992 (seed 1); bf16-mixed, emulated fp16 and fp8-mixed
      all give 0.997. fp8-mixed equals bf16-mixed here: torchao converts only
      ``nn.Linear`` layers whose sizes are multiples of 16, and the one linear (64 -> 10)
      is not, so every matmul stays bf16 (the policy's ``fp8_skipped`` says so).

Use it as ``mixprec.recipes.vision.vision(**kwargs)`` or by name: ``mixprec train vision``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "vision")
_check_float = functools.partial(check_float, "vision")

__all__ = ["BasicBlock", "ResNet", "load_vision_data", "shift_images", "accuracy", "linear_decay", "vision"]

NUM_CLASSES = 10

# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def _load(image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mixprec.recipes.digits import load_digits_split, upsample

    train_x, train_y, val_x, val_y = load_digits_split()
    train_x, val_x = upsample(train_x, image_size), upsample(val_x, image_size)
    mean, std = train_x.mean(), train_x.std()
    return ((train_x - mean) / std).contiguous(), train_y, ((val_x - mean) / std).contiguous(), val_y


def load_vision_data(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, val_x, val_y)``: the digits upsampled to ``image_size`` and
    standardized with the training set's pixel mean and std (``float32 (N, 1, S, S)``).
    Cached per process and shared: treat the tensors as read-only."""
    _check_int("image_size", image_size, minimum=8)
    return _load(int(image_size))


def shift_images(images: torch.Tensor, shift: int, generator: torch.Generator,
                 fill: float = 0.0) -> torch.Tensor:
    """Each image moved by its own random (dy, dx), whole pixels in ``[-shift, shift]``,
    drawn from ``generator``; pixels shifted in from outside are ``fill``."""
    if shift == 0:
        return images
    n, _, h, w = images.shape
    d = torch.randint(-shift, shift + 1, (n, 2), generator=generator)
    padded = F.pad(images, (shift, shift, shift, shift), value=fill)
    rows = (shift - d[:, 0:1]) + torch.arange(h)  # output row r reads padded row r + shift - dy
    cols = (shift - d[:, 1:2]) + torch.arange(w)
    b = torch.arange(n)[:, None, None]
    return padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, momentum=bn_momentum),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``forward(images (B, 1, S, S)) -> logits (B, num_classes)``."""

    def __init__(self, width: int = 64, stage_blocks: Sequence[int] = (1, 1, 1), stem_stride: int = 2,
                 num_classes: int = NUM_CLASSES, in_channels: int = 1, bn_momentum: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width, momentum=bn_momentum),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = width
        for i, n_blocks in enumerate(stage_blocks):
            out = width * 2 ** i
            blocks = [BasicBlock(channels, out, stride=1 if i == 0 else 2, bn_momentum=bn_momentum)]
            blocks += [BasicBlock(out, out, bn_momentum=bn_momentum) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- metric


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max logit is the label (a 0-dim fp32 tensor)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"accuracy needs logits (N, C) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels).float().mean()


# --------------------------------------------------------------------------- lr schedule

MIN_LR_FRACTION = 0.02  # the schedule's floor, as a fraction of the peak lr


def linear_decay(optimizer: torch.optim.Optimizer, decay_steps: int,
                 min_fraction: float = MIN_LR_FRACTION) -> torch.optim.Optimizer:
    """Make ``optimizer``'s lr fall linearly from its value now to ``min_fraction`` of it over
    ``decay_steps`` steps, then stay there; returns the optimizer.

    The schedule lives in the optimizer itself, through its public step hooks: the peak lr
    and the number of steps taken are kept in each param group (``"peak_lr"``,
    ``"decay_step"``), so they are part of ``optimizer.state_dict()``: a checkpoint resumes
    the schedule exactly, and a step the engine skips (non-finite gradients) does not
    advance it, since the optimizer's ``step`` is not called then.
    """
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group.setdefault("decay_step", 0)

    def set_lr(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            frac = max(1.0 - group["decay_step"] / decay_steps, min_fraction)
            group["lr"] = group["peak_lr"] * frac

    def count(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            group["decay_step"] += 1

    optimizer.register_step_pre_hook(set_lr)
    optimizer.register_step_post_hook(count)
    return optimizer


# --------------------------------------------------------------------------- task


def vision(width: int = 64, stage_blocks: Sequence[int] = (1, 1, 1), image_size: int = 32,
           batch_size: int = 64, lr: float = 5e-3, weight_decay: float = 0.05, shift: int = 1,
           bn_momentum: float = 0.3, decay_steps: int = 200, eval_batch_size: int = 360) -> Task:
    """The ``vision`` Task: a small ResNet on the upsampled digits (see module doc)."""
    for name, value in [("width", width), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)]:
        _check_int(name, value)
    _check_int("image_size", image_size, minimum=8)
    _check_int("shift", shift, minimum=0)
    _check_int("decay_steps", decay_steps, minimum=0)
    if (isinstance(stage_blocks, (str, bytes)) or not isinstance(stage_blocks, (list, tuple))
            or not stage_blocks
            or not all(not isinstance(b, bool) and isinstance(b, numbers.Integral) and b >= 1
                       for b in stage_blocks)):
        raise UsageError(f"vision: stage_blocks must be a non-empty list of positive integers "
                         f"(blocks per stage, e.g. (1, 1, 2)), got {stage_blocks!r}")
    stage_blocks = tuple(int(b) for b in stage_blocks)
    if image_size < 2 ** len(stage_blocks):
        raise UsageError(f"vision: image_size={image_size} is too small for {len(stage_blocks)} "
                         f"stages (the stem and each stage after the first halve it); use "
                         f"image_size >= {2 ** len(stage_blocks)}")
    if shift >= image_size:
        raise UsageError(f"vision: shift={shift} must be smaller than image_size={image_size}")
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("bn_momentum", bn_momentum, low=0.0, high=1.0, high_inclusive=True)

    train_x, train_y, val_x, val_y = load_vision_data(image_size)
    fill = float(train_x.min())  # the standardized value of a blank pixel
    val_batches = list(zip(val_x.split(eval_batch_size), val_y.split(eval_batch_size)))

    def build_model() -> nn.Module:
        return ResNet(width=width, stage_blocks=stage_blocks, stem_stride=2, bn_momentum=bn_momentum)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [  # no weight decay on BatchNorm's gamma/beta or on biases
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        return linear_decay(optimizer, decay_steps) if decay_steps else optimizer

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            idx = torch.randint(0, len(train_y), (batch_size,), generator=gen)
            yield shift_images(train_x[idx], shift, gen, fill), train_y[idx]

    def _forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        device = next(model.parameters()).device
        logits = model(x.to(device, non_blocking=True)).float()
        return logits, y.to(device, non_blocking=True)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        logits, y = _forward(model, batch)
        return F.cross_entropy(logits, y)

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                total_loss = total_correct = 0.0
                for batch in val_batches:
                    logits, y = _forward(model, batch)
                    total_loss = total_loss + F.cross_entropy(logits, y, reduction="sum")
                    total_correct = total_correct + (logits.argmax(dim=1) == y).sum()
                sums = torch.stack([torch.as_tensor(total_loss, dtype=torch.float64),
                                    torch.as_tensor(total_correct, dtype=torch.float64)]).tolist()
        finally:
            for m, was_training in modes:
                m.training = was_training
        n = len(val_y)
        return {"accuracy": sums[1] / n, "val_loss": sums[0] / n}

    return Task(name="vision", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="vision",
    factory=vision,
    domain="image classification",
    model="ResNet-style CNN with BatchNorm (3x3 stem, BasicBlocks 32-64-128 channels x (1, 1, 2), "
          "global average pool, linear head)",
    data="scikit-learn handwritten digits (8x8 scans) upsampled to 32x32, random shifts of up to 2 px",
    metric="accuracy on the 360 validation digits (chance 10%), val_loss (cross-entropy)",
    description="Digit classification with a small BatchNorm ResNet; no downloads.",
    metric_key="accuracy",
    higher_is_better=True,
    expected_fp32=(0.97, 1.0),
    verify_steps=200,
    tiny=dict(width=16, image_size=16, batch_size=32, decay_steps=0, eval_batch_size=180),
    tiny_steps=10,
)
