"""The ``asr`` recipe: CTC speech recognition of synthetic "spoken symbols".

What it is
    A small CTC acoustic model: a convolutional front-end (two ``Conv1d`` layers, kernel 3,
    stride 2 each: time is subsampled 4x, 10 ms -> 40 ms frames, GELU) followed by a
    Transformer encoder (pre-LN blocks, bidirectional ``F.scaled_dot_product_attention``
    with a key-padding mask, GELU MLP, sinusoidal positions) and a linear head over the 10
    symbols plus the CTC blank (class 0). Trained with ``F.ctc_loss`` on
    ``log_softmax(logits.float())`` (blank 0, ``zero_infinity=True``, input lengths after
    the subsampling, loss averaged over target lengths and the batch).

The data
    Synthetic utterances from :mod:`mixprec.recipes.audio`: 3-6 random symbols of a
    10-symbol vowel-like alphabet (5 steady formant patterns, 5 two-part formant glides),
    each rendered as a formant-filtered harmonic series with its own random duration
    (80-160 ms), pitch (speaker 90-220 Hz, per-symbol jitter, drift, declination), envelope
    and level, silences of 20-60 ms between symbols, white noise at 10-30 dB SNR, 8 kHz.
    Features: 40 log-mel bands (``torch.stft``, 256-point Hann window, 10 ms hop, a mel
    filterbank built in :mod:`~mixprec.recipes.audio`, log floor 1e-6), normalized per band
    with the training pool's mean and standard deviation. The data seed is fixed: a pool of
    ``n_train`` training utterances and ``n_val`` validation utterances (other generator
    streams, so never the same utterance), synthesized once per process and cached.
    Training batches draw ``batch_size`` utterances from the pool per step (with a
    ``torch.Generator`` seeded by the training seed), padded to the longest one.

Metric
    ``evaluate()`` decodes the validation set greedily (best class per frame, repeats
    collapsed, blanks dropped) and reports the character (symbol) error rate
    ``cer = sum of edit distances / sum of reference lengths`` (lower is better) and
    ``val_loss`` (the training CTC loss on the validation set). Chance: an empty output
    (what a CTC model gives while it predicts only blanks, its usual first plateau) has
    CER 1.0; guessing the most frequent symbol at every reference position would still
    be about 0.9 (10 equally frequent symbols).

Expected numbers (fp32, defaults, 60 steps = ``verify_steps``; 2-core AMD EPYC with
AVX512_BF16, torch 2.13)
    * loss 8.29 at step 1; CER leaves 1.0 within the first 20-30 steps. After 60 steps
      ``evaluate`` gives cer 0.023 / val_loss 0.079 (seed 0), cer 0.021 and 0.019 for seeds
      1 and 2; after 100 steps cer 0.009-0.015 (seeds 0-2).
    * The data (1,024 + 256 utterances, synthesized and featurized once per process) takes
      about 7 s of CPU time.
    * Step time: about 130 ms fp32, 60 steps in about 8 s. bf16 autocast speed-up in
      ``mixprec verify --all`` (30 interleaved rounds, quiet machine): 1.38x [1.28, 1.43]
      (docs/results.md).
    * Model input scaling: the front-end's output is multiplied by ``sqrt(d_model)`` before
      the sinusoidal positions are added (as ESPnet's conv subsampling does). Without it the
      positions (RMS 0.7) swamp the features (RMS 0.1-0.3) and the blank plateau lasted from
      40 to over 100 steps depending on the seed (seed 1: cer 0.39 after 100 steps at
      lr 3e-3), so fp32's own seed-to-seed difference was 5x the final loss and ``verify``
      compared almost nothing. With it, every seed tried is below cer 0.04 at step 40.

Precision notes
    Checked with forward hooks under CPU bf16 autocast: the convolutions, the linears
    (including the head) and attention output bf16; LayerNorm outputs fp32, and so does the
    residual stream (the bf16 front-end output plus the fp32 positions promotes to fp32,
    and every block adds bf16 updates to it); the log-softmax and the CTC loss run in fp32
    on ``logits.float()``. No ``--keep-fp32`` rule is needed for bf16 or emulated fp16.
    fp16 loss scale: at the first step the CTC gradient pushes every frame toward blank at
    once, and ``head.weight``'s gradient (a sum over all B x T' frames) exceeds 1 in places:
    at the default initial scale of 2**16 it overflows fp16 and the step is skipped. Over 60
    steps, on the steepest part of the curve, that one lost step made emulated fp16 fail
    ``verify`` (cer 0.040 vs 0.023; final loss 57% apart). So the recipe asks for an initial
    scale of 2**10 (``RECIPE.scaler``, as fairseq's ``--fp16-init-scale`` does for its models):
    no step is skipped and emulated fp16 lands within 0.1% of fp32's final loss (same cer).
    There is no recurrent encoder on purpose: on CPU, autocast runs an ``nn.LSTM`` in bf16
    (through its oneDNN kernel) but leaves an ``nn.GRU`` in fp32, and mixprec's fp16
    emulation intercepts neither, so a Transformer encoder is both faster in bf16 and
    honestly exercised by emulation.

Use it as ``mixprec.recipes.asr.asr(**kwargs)`` or by name: ``mixprec train asr``.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes import audio
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "asr")
_check_float = functools.partial(check_float, "asr")

__all__ = ["CTCModel", "EncoderBlock", "asr", "edit_distance", "greedy_decode", "cer",
           "load_asr_data", "BLANK"]

BLANK = 0
N_CLASSES = audio.N_SYMBOLS + 1  # symbols 1..N plus the blank
N_MELS = 40
HOP = 80  # 10 ms at 8 kHz
SUBSAMPLE = 4

# --------------------------------------------------------------------------- metric


def edit_distance(ref: Sequence[int], hyp: Sequence[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions, each cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def greedy_decode(best: Sequence[int], blank: int = BLANK) -> list[int]:
    """CTC greedy decoding of per-frame best classes: collapse repeats, then drop blanks."""
    out, last = [], None
    for c in best:
        c = int(c)
        if c != last and c != blank:
            out.append(c)
        last = c
    return out


def cer(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """Corpus error rate: total edit distance over total reference length."""
    if len(refs) != len(hyps):
        raise ValueError(f"cer: {len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("cer: the references are all empty")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


# --------------------------------------------------------------------------- data


def _features(waves: Sequence, chunk: int = 64) -> list[torch.Tensor]:
    """Log-mel frames of each waveform, computed in zero-padded chunks (exact, see log_mel)."""
    out = []
    for i in range(0, len(waves), chunk):
        part = [torch.from_numpy(w) for w in waves[i:i + chunk]]
        feats = audio.log_mel(nn.utils.rnn.pad_sequence(part, batch_first=True), hop=HOP,
                              n_mels=N_MELS)
        out.extend(f[: 1 + len(w) // HOP] for f, w in zip(feats, part))
    return out


def _pack(feats: list[torch.Tensor], labels) -> tuple[torch.Tensor, ...]:
    lengths = torch.tensor([len(f) for f in feats])
    x = nn.utils.rnn.pad_sequence(feats, batch_first=True)
    label_lengths = torch.tensor([len(lab) for lab in labels])
    y = torch.zeros(len(labels), int(label_lengths.max()), dtype=torch.long)
    for i, lab in enumerate(labels):
        y[i, : len(lab)] = torch.tensor(lab)
    return x.contiguous(), lengths, y, label_lengths


@functools.lru_cache(maxsize=4)
def load_asr_data(n_train: int, n_val: int, min_symbols: int = 3, max_symbols: int = 6):
    """``(train, val)``, each ``(feats (N, T, 40), lengths (N,), labels (N, L), label_lengths (N,))``.

    Features are normalized per band with the training pool's statistics (over its real
    frames, not the padding); padding frames are zero. Cached per process and shared:
    treat the tensors as read-only.
    """
    tw, tl = audio.utterance_set(audio.STREAM_TRAIN, n_train, min_symbols, max_symbols)
    vw, vl = audio.utterance_set(audio.STREAM_VAL, n_val, min_symbols, max_symbols)
    train_f, val_f = _features(tw), _features(vw)
    frames = torch.cat(train_f)
    mean, std = frames.mean(0), frames.std(0).clamp_min(1e-3)
    train_f = [(f - mean) / std for f in train_f]
    val_f = [(f - mean) / std for f in val_f]
    return _pack(train_f, tl), _pack(val_f, vl)


def _conv_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """A stride-2, kernel-3, padding-1 conv maps L frames to (L - 1) // 2 + 1."""
    return torch.div(lengths - 1, 2, rounding_mode="floor") + 1


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after the front-end's two stride-2 convs (4x subsampling)."""
    return _conv_lengths(_conv_lengths(lengths))


def _valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` bool: frame t is a real frame of utterance b."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------- model


class EncoderBlock(nn.Module):
    """Pre-LN Transformer encoder block (bidirectional attention with a key-padding mask)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.fc_proj(F.gelu(self.fc(self.ln2(x)))))


def _sinusoids(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class CTCModel(nn.Module):
    """``forward(feats (B, T, n_mels), lengths (B,)) -> (logits (B, T', classes), lengths (B,))``."""

    def __init__(self, n_mels: int = N_MELS, d_model: int = 192, n_layer: int = 3, n_head: int = 4,
                 n_classes: int = N_CLASSES, dropout: float = 0.0, max_frames: int = 1024):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self.register_buffer("pos", _sinusoids(max_frames, d_model), persistent=False)
        self.x_scale = math.sqrt(d_model)  # features * sqrt(d) + positions, as in ESPnet's subsampling
        for block in self.blocks:  # GPT-2-style smaller init of the residual projections
            for lin in (block.proj, block.fc_proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layer))
                nn.init.zeros_(lin.bias)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Frames past each utterance's length are zeroed after every conv, so a zero-padded
        # utterance gives the same outputs in any batch (its convs see zeros, as at its end).
        len1 = _conv_lengths(lengths.to(feats.device))
        x = F.gelu(self.conv1(feats.transpose(1, 2)))  # (B, d, T / 2)
        x = x * _valid(len1, x.shape[2])[:, None]
        out_lengths = _conv_lengths(len1)
        x = F.gelu(self.conv2(x))  # (B, d, T')
        T = x.shape[2]
        if T > self.pos.shape[0]:
            raise ValueError(f"{T} frames after subsampling exceed max_frames={self.pos.shape[0]}")
        valid = _valid(out_lengths, T)  # (B, T')
        x = (x * valid[:, None]).transpose(1, 2)  # (B, T', d)
        mask = valid[:, None, None, :]  # attend to real frames only
        x = x * self.x_scale + self.pos[:T]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x)), out_lengths


# --------------------------------------------------------------------------- task


def asr(d_model: int = 192, n_layer: int = 3, n_head: int = 4, batch_size: int = 32,
        lr: float = 2e-3, weight_decay: float = 0.01, dropout: float = 0.0,
        n_train: int = 1024, n_val: int = 256, min_symbols: int = 3, max_symbols: int = 6,
        eval_batch_size: int = 128) -> Task:
    """The ``asr`` Task: CTC recognition of synthetic spoken symbols (see module doc)."""
    for name, value in [("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head),
                        ("batch_size", batch_size), ("n_train", n_train), ("n_val", n_val),
                        ("min_symbols", min_symbols), ("max_symbols", max_symbols),
                        ("eval_batch_size", eval_batch_size)]:
        _check_int(name, value)
    if d_model % n_head != 0:
        raise UsageError(
            f"asr: d_model={d_model} must be divisible by n_head={n_head}; valid n_head "
            f"for this d_model: {[h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]}"
        )
    if d_model % 2:
        raise UsageError(f"asr: d_model must be even (sinusoidal positions), got {d_model!r}")
    if max_symbols < min_symbols:
        raise UsageError(f"asr: max_symbols={max_symbols!r} must be >= min_symbols={min_symbols!r}")
    if max_symbols > 20:
        raise UsageError(f"asr: max_symbols must be at most 20 (utterances stay a few seconds), "
                         f"got {max_symbols!r}")
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("dropout", dropout, low=0.0, low_inclusive=True, high=1.0)

    train, val = load_asr_data(n_train, n_val, min_symbols, max_symbols)
    train_x, train_len, train_y, train_ylen = train

    def build_model() -> nn.Module:
        return CTCModel(d_model=d_model, n_layer=n_layer, n_head=n_head, dropout=dropout)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

    def take(data, idx: torch.Tensor):
        x, lengths, y, ylen = data
        lengths, ylen = lengths[idx], ylen[idx]
        return (x[idx, : int(lengths.max())].contiguous(), lengths,
                y[idx, : int(ylen.max())].contiguous(), ylen)

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            yield take(train, torch.randint(0, n_train, (batch_size,), generator=gen))

    def forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
        x, lengths, y, ylen = batch
        device = next(model.parameters()).device
        logits, out_lengths = model(x.to(device, non_blocking=True), lengths.to(device))
        return logits, out_lengths, y.to(device, non_blocking=True), ylen.to(device)

    def ctc(logits, out_lengths, y, ylen) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T', B, C)
        return F.ctc_loss(log_probs, y, out_lengths, ylen, blank=BLANK, reduction="mean",
                          zero_infinity=True)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return ctc(*forward(model, batch))

    order = torch.arange(n_val)
    val_batches = [take(val, idx) for idx in order.split(eval_batch_size)]
    val_refs = [val[2][i, : int(val[3][i])].tolist() for i in range(n_val)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                losses, bests, lens = [], [], []
                for b in val_batches:
                    logits, out_lengths, y, ylen = forward(model, b)
                    losses.append(ctc(logits, out_lengths, y, ylen) * len(ylen))
                    bests.append(logits.argmax(-1))
                    lens.append(out_lengths)
                width = max(t.shape[1] for t in bests)
                best = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in bests])
                total = torch.stack(losses).sum()
                # One host sync: everything that leaves the device goes in one transfer.
                packed = torch.cat([best.flatten(), torch.cat(lens),
                                    total.double().view(1).to(best.device).view(torch.long)]).cpu()
        finally:
            for m, was_training in modes:
                m.training = was_training
        n = best.numel()
        best_rows = packed[:n].view(best.shape).tolist()
        lengths = packed[n:n + n_val].tolist()
        val_loss = float(packed[n + n_val:].view(torch.float64)[0]) / n_val
        hyps = [greedy_decode(row[:length]) for row, length in zip(best_rows, lengths)]
        return {"cer": cer(val_refs, hyps), "val_loss": val_loss}

    return Task(name="asr", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="asr",
    factory=asr,
    domain="speech recognition",
    model="Conv1d front-end (4x subsampling) + 3-layer Transformer encoder (d_model 192), CTC head",
    data="synthetic spoken-symbol utterances (10 formant patterns, 8 kHz, noisy), 40 log-mels",
    metric="cer (greedy CTC symbol error rate), val_loss (CTC)",
    description="CTC recognition of random symbol sequences synthesized in numpy; no downloads.",
    metric_key="cer",
    higher_is_better=False,
    expected_fp32=(0.005, 0.06),
    verify_steps=60,
    tiny=dict(d_model=32, n_layer=1, n_head=2, batch_size=8, n_train=64, n_val=32),
    scaler=dict(init_scale=2.0**10),  # see "fp16 loss scale" in the module doc
)
