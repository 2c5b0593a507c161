"""Tasks with a planted numerics problem, for the monitor, localization and controller tests.

- ``overflow_task``: an MLP classifier whose ``amp`` layer produces activations of about
  1e5: beyond fp16's max (65504), well inside bf16's range; a LayerNorm right after brings
  them back. fp32 and bf16 train; fp16-mixed overflows exactly in ``amp``.
- ``underflow_task``: a regression whose loss is scaled by 1e-5, so its gradients sit in
  fp16's subnormal range (below the smallest normal, 6.1e-5) unless the loss is scaled.
- ``nan_task``: a deep stack of Linear layers with a module at ``depth`` that turns its
  output into NaN from step ``from_step`` on.
"""

from __future__ import annotations

import torch
from torch import nn

import mixprec

DIM, CLASSES = 16, 4


def _clusters(seed: int, n: int):
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(CLASSES, DIM, generator=g) * 2.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[y] + torch.randn(n, DIM, generator=g), y


class Amplifier(nn.Module):
    """A Linear whose output is multiplied by ``gain``: large activations on purpose."""

    def __init__(self, width: int, gain: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gain


class OverflowNet(nn.Module):
    def __init__(self, width: int = 64, gain: float = 2e5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, width)
        self.act = nn.GELU()
        self.amp = Amplifier(width, gain)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.amp(self.act(self.fc1(x)))))


def _accuracy(model: nn.Module) -> dict[str, float]:
    x, y = _clusters(seed=999, n=512)
    logits = model(x).float()
    return {"accuracy": (logits.argmax(-1) == y).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, y).item()}


def overflow_task(batch_size: int = 64, gain: float = 2e5, lr: float = 3e-3) -> mixprec.Task:
    def batches(seed: int):
        step = 0
        while True:
            yield _clusters(seed * 100_003 + step, batch_size)
            step += 1

    return mixprec.Task(
        name="planted-overflow",
        build_model=lambda: OverflowNet(gain=gain),
        build_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        train_batches=batches,
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]).float(), b[1]),
        evaluate=_accuracy,
    )


def underflow_task(batch_size: int = 64, loss_factor: float = 1e-5, lr: float = 1e-2) -> mixprec.Task:
    w_true = torch.linspace(-1, 1, DIM)

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(batch_size, DIM, generator=g)
            yield x, x @ w_true

    def evaluate(model: nn.Module) -> dict[str, float]:
        x = torch.randn(256, DIM, generator=torch.Generator().manual_seed(7))
        return {"mse": nn.functional.mse_loss(model(x).squeeze(-1).float(), x @ w_true).item()}

    return mixprec.Task(
        name="planted-underflow",
        build_model=lambda: nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 1)),
        # Adam normalizes the gradient's scale away, so tiny-but-represented gradients train fine.
        build_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        train_batches=batches,
        loss=lambda m, b: nn.functional.mse_loss(m(b[0]).squeeze(-1).float(), b[1]) * loss_factor,
        evaluate=evaluate,
    )


class PoisonAfter(nn.Module):
    """Identity, until ``from_step`` forward calls in train mode: then NaN."""

    def __init__(self, from_step: int) -> None:
        super().__init__()
        self.from_step = from_step
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        poisoned = self.training and int(self.calls) >= self.from_step
        return x * self.scale * (float("nan") if poisoned else 1.0)


def nan_task(depth: int = 5, layers: int = 12, from_step: int = 3, batch_size: int = 16) -> mixprec.Task:
    def build() -> nn.Module:
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [PoisonAfter(from_step)] if i == depth else []
            mods += [nn.Linear(DIM, DIM), nn.Tanh()]
        return nn.Sequential(*mods, nn.Linear(DIM, CLASSES))

    def batches(seed: int):
        step = 0
        while True:
            yield _clusters(seed * 7919 + step, batch_size)
            step += 1

    return mixprec.Task(
        name="planted-nan",
        build_model=build,
        build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
        train_batches=batches,
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]).float(), b[1]),
    )
