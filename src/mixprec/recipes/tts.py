"""The ``tts`` recipe: an unconditional WaveNet on synthetic voiced speech, 8-bit mu-law.

What it is
    A small WaveNet (van den Oord et al., 2016): a causal input convolution (kernel 2) from
    the previous sample, then ``n_stacks`` stacks of causal dilated ``Conv1d`` layers
    (kernel 2, dilations 1, 2, 4, ..., ``2**(layers_per_stack - 1)``), each with a gated
    activation ``tanh(a) * sigmoid(b)``, a 1x1 residual convolution back into the residual
    stream and a 1x1 skip convolution into a summed skip stream; the head is
    ``ReLU -> 1x1 conv -> ReLU -> 1x1 conv`` to 256 logits over mu-law (mu = 255) classes.
    The input is the previous sample's mu-law class decoded back to the signal value in
    [-1, 1] (a scalar per time step). The linear signal value beats the companded value
    ``2 q / 255 - 1`` as input here (5.65 against 5.88 bits after 75 steps, same seed):
    the next sample is close to a linear function of the previous ones (harmonics below
    3 kHz at 8 kHz), so the first layers need not undo the companding. Causality comes from left padding only (no future sample reaches an output):
    output ``t`` is the distribution of sample ``t + 1`` given samples ``0..t``. There is no
    conditioning (no text, no mel): "tts" here means the vocoder half of a TTS system,
    trained unconditionally.

The data
    Continuous voiced waveforms from :mod:`mixprec.recipes.audio` (8 kHz): random sequences
    of the 10 formant patterns of the ``asr`` recipe, without silences (the envelope dips
    between symbols), each a formant-filtered harmonic series with slowly varying pitch
    (90-220 Hz speakers, jitter, drift, declination), white noise at 30-40 dB SNR, RMS
    0.1-0.25; quantized with 8-bit mu-law. The data seed is fixed: ``n_train`` training
    and ``n_val`` validation waveforms of ``wave_seconds`` seconds each (other generator
    streams), synthesized once per process and cached. Training batches are
    ``batch_size`` random crops of ``crop + 1`` samples (a ``torch.Generator`` seeded by the
    training seed picks the waveform and the offset); teacher forcing: inputs are samples
    ``0..crop-1``, targets ``1..crop``, every position is scored (the first ones see zero
    padding instead of history, as at the start of a real waveform). The loss is
    cross-entropy on ``logits.float()``.

Metric
    ``evaluate()`` gives the validation negative log-likelihood in bits per sample,
    ``nll_bits = cross-entropy in nats / ln 2`` (lower is better), over ``eval_crops`` fixed
    crops (evenly spread over the validation waveforms), and ``val_loss`` (the same in
    nats). Chance: a uniform model over the 256 classes gives exactly 8 bits; the best
    static (unigram) distribution of the training samples gives about 7.5 bits.

Expected numbers (fp32, defaults, 60 steps = ``verify_steps``; 2-core AMD EPYC with
AVX512_BF16, torch 2.13)
    * loss 5.58 nats at step 1 (ln 256 = 5.55), 4.00 at step 60; ``evaluate`` then gives
      nll_bits 5.649 (seed 0) and 5.634 (seed 1). Training longer keeps improving it:
      5.43 bits after 100 steps, 5.29 after 125 (seed 0). For scale: an order-16 linear
      predictor fitted by least squares to the whole training pool, with one Gaussian
      residual, scores 5.38 bits on the validation waveforms (order 2: 5.71).
    * lr 5e-3 beats 2e-3 slightly (5.61 against 5.65 bits after 75 steps); the data takes
      about 1 s to synthesize.
    * Step time, as ``mixprec verify --all`` measured it on a quiet machine (30 interleaved
      rounds, docs/results.md): bf16 autocast 1.16x [1.13, 1.20]; emulated fp16 0.64x
      (emulation costs, as every conv's inputs and outputs are rounded in Python).

Precision notes
    Checked with forward hooks under CPU bf16 autocast: every convolution outputs bf16, and
    since the input convolution's output is bf16, the whole residual stream, the gates and
    the summed skip stream stay bf16 too (bf16 + bf16 is bf16); only the cross-entropy runs
    in fp32, on ``logits.float()``. That is plain autocast, and it passes ``verify`` at the
    defaults in bf16 (nll 5.607 against fp32's 5.649 bits) and emulated fp16 (5.658), so
    no ``--keep-fp32`` rule or fp32 residual stream was added.

Use it as ``mixprec.recipes.tts.tts(**kwargs)`` or by name: ``mixprec train tts``.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes import audio
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.audio import mulaw_decode, mulaw_encode
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "tts")
_check_float = functools.partial(check_float, "tts")

__all__ = ["WaveNet", "ResidualLayer", "CausalConv1d", "tts", "load_tts_data", "mulaw_encode",
           "mulaw_decode", "N_CLASSES"]

MU = 255
N_CLASSES = MU + 1

# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def load_tts_data(n_train: int, n_val: int, n_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` mu-law classes, ``torch.long`` of shape ``(n, n_samples)``.

    Cached per process and shared: treat the tensors as read-only.
    """
    train = audio.voiced_set(audio.STREAM_VOICED_TRAIN, n_train, n_samples)
    val = audio.voiced_set(audio.STREAM_VOICED_VAL, n_val, n_samples)
    return mulaw_encode(torch.from_numpy(train), MU), mulaw_encode(torch.from_numpy(val), MU)


# --------------------------------------------------------------------------- model


class CausalConv1d(nn.Conv1d):
    """``Conv1d`` padded on the left only: output ``t`` sees inputs ``t - (k-1)*d .. t``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class ResidualLayer(nn.Module):
    """Dilated causal conv -> tanh * sigmoid gate -> (residual 1x1, skip 1x1)."""

    def __init__(self, residual: int, gate: int, skip: int, dilation: int):
        super().__init__()
        self.dilated = CausalConv1d(residual, 2 * gate, 2, dilation)
        self.res = nn.Conv1d(gate, residual, 1)
        self.skip = nn.Conv1d(gate, skip, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.dilated(x).chunk(2, dim=1)
        z = torch.tanh(a) * torch.sigmoid(b)
        return x + self.res(z), self.skip(z)


class WaveNet(nn.Module):
    """``forward(x (B, 1, T) float in [-1, 1]) -> logits (B, 256, T)`` over the next sample."""

    def __init__(self, residual: int = 32, gate: int = 32, skip: int = 64,
                 layers_per_stack: int = 8, n_stacks: int = 2, n_classes: int = N_CLASSES):
        super().__init__()
        self.input = CausalConv1d(1, residual, 2, 1)
        self.layers = nn.ModuleList(
            ResidualLayer(residual, gate, skip, 2 ** i)
            for _ in range(n_stacks) for i in range(layers_per_stack)
        )
        self.head1 = nn.Conv1d(skip, skip, 1)
        self.head2 = nn.Conv1d(skip, n_classes, 1)
        self.receptive_field = 1 + sum(layer.dilated.left for layer in self.layers) + self.input.left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        skips = None
        for layer in self.layers:
            h, s = layer(h)
            skips = s if skips is None else skips + s
        return self.head2(F.relu(self.head1(F.relu(skips))))


# --------------------------------------------------------------------------- task


def tts(residual: int = 32, gate: int = 32, skip: int = 64, layers_per_stack: int = 8,
        n_stacks: int = 2, crop: int = 1024, batch_size: int = 8, lr: float = 5e-3,
        weight_decay: float = 0.0, n_train: int = 64, n_val: int = 16,
        wave_seconds: float = 2.0, eval_crops: int = 16) -> Task:
    """The ``tts`` Task: unconditional mu-law WaveNet on synthetic voiced audio (see module doc)."""
    for name, value in [("residual", residual), ("gate", gate), ("skip", skip),
                        ("layers_per_stack", layers_per_stack), ("n_stacks", n_stacks),
                        ("crop", crop), ("batch_size", batch_size), ("n_train", n_train),
                        ("n_val", n_val), ("eval_crops", eval_crops)]:
        _check_int(name, value)
    if layers_per_stack > 14:
        raise UsageError(f"tts: layers_per_stack must be at most 14 (dilation 8192), got {layers_per_stack!r}")
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("wave_seconds", wave_seconds, low=0.0, low_inclusive=False, high=60.0)
    n_samples = int(round(wave_seconds * audio.SAMPLE_RATE))
    if n_samples < crop + 1:
        raise UsageError(
            f"tts: wave_seconds={wave_seconds!r} gives {n_samples} samples per waveform, fewer than "
            f"crop + 1 = {crop + 1}; raise wave_seconds or lower crop"
        )

    train, val = load_tts_data(n_train, n_val, n_samples)
    offsets = torch.arange(crop + 1)

    def crops(data: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = data[rows[:, None], starts[:, None] + offsets]  # (B, crop + 1) classes
        return mulaw_decode(chunk[:, None, :-1], MU).contiguous(), chunk[:, 1:].contiguous()

    def build_model() -> nn.Module:
        return WaveNet(residual=residual, gate=gate, skip=skip, layers_per_stack=layers_per_stack,
                       n_stacks=n_stacks)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr)

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        high = n_samples - crop
        while True:
            rows = torch.randint(0, n_train, (batch_size,), generator=gen)
            starts = torch.randint(0, high, (batch_size,), generator=gen)
            yield crops(train, rows, starts)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        logits = model(x.to(device, non_blocking=True))
        return F.cross_entropy(logits.float(), y.to(device, non_blocking=True))

    # Fixed validation crops: eval_crops windows spread evenly over all validation samples.
    flat = torch.linspace(0, n_val * (n_samples - crop - 1), eval_crops).long()
    rows, starts = flat // (n_samples - crop), flat % (n_samples - crop)
    val_batches = [crops(val, r, s) for r, s in zip(rows.split(batch_size), starts.split(batch_size))]

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                total = sum(loss(model, b) * len(b[1]) for b in val_batches)
            val_loss = float(total) / eval_crops  # one host sync
        finally:
            for m, was_training in modes:
                m.training = was_training
        return {"nll_bits": val_loss / math.log(2), "val_loss": val_loss}

    return Task(name="tts", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="tts",
    factory=tts,
    domain="speech synthesis",
    model="WaveNet: 2 stacks x 8 causal dilated Conv1d layers (dilations 1..128), gated, 32/64 channels",
    data="synthetic voiced speech-like waveforms (8 kHz, 8-bit mu-law), random crops",
    metric="nll_bits (validation NLL, bits/sample), val_loss (nats)",
    description="Unconditional next-sample prediction over 256 mu-law classes; no downloads.",
    metric_key="nll_bits",
    higher_is_better=False,
    expected_fp32=(5.3, 6.0),
    verify_steps=60,
    tiny=dict(residual=16, gate=16, skip=32, layers_per_stack=4, n_stacks=1, crop=256,
              batch_size=4, n_train=4, n_val=2, wave_seconds=0.25, eval_crops=4),
)
