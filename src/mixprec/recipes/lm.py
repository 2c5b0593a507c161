"""The ``lm`` recipe: a small GPT-style byte-level decoder on Python's own source code.

What it is
    A nanoGPT-style decoder-only transformer (pre-LN blocks, fused QKV attention through
    ``F.scaled_dot_product_attention(is_causal=True)``, GELU MLP, learned positional
    embedding, an untied ``lm_head``) that predicts the next byte. The vocabulary is the
    256 byte values, so there is no tokenizer and nothing to download.

The data
    The ``.py`` files of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and ``__pycache__``):
    real text that every machine with Python has. Files are taken in sorted order of
    their relative POSIX path and read until ``max_bytes`` bytes in total have been read
    (the last file is cut short), so loading takes milliseconds. Each file goes to the
    validation split when ``zlib.crc32(relative_path) % 10 == 0`` and to the training
    split otherwise: the split is by file, stable across runs and machines with the same
    Python, and no file contributes to both. Files are joined with a NUL separator byte.

Expected numbers (fp32, defaults; 2-core AMD EPYC with AVX512_BF16, torch 2.13,
CPython 3.11 stdlib: 1.87 MB train / 0.13 MB validation bytes, loaded in < 0.1 s)
    * after 100 steps ``evaluate`` gives val_loss 2.61 (seed 0) and 2.64 (seed 1),
      perplexity about 14; about 17 s for the 100 steps.
    * step time (forward + backward + AdamW), median: fp32 about 165 ms, bf16 autocast
      about 90 ms: 1.87x [1.80, 1.99] and 1.94x [1.89, 2.04] in two runs of
      benchmarks/scaling.py (interleaved, 60 rounds, idle machine).
    * why d_model 256: at d_model 128 the same step is 69 ms vs 57 ms (1.16x), because
      much of it is per-op overhead rather than matmuls, and a recipe that shows no
      speed-up from bf16 is not a fair test of mixed precision. At 512 it is 2.6x, but
      100 steps then take about a minute in fp32, too long for ``verify --all``.
    * lr 1e-3 (constant, no warm-up) beats 3e-3 here: at 3e-3 the loss sits on the
      ~2.8-3.0 plateau for most of the first 100 steps (measured at d_model 128).

Use it as ``mixprec.recipes.lm.lm(**kwargs)`` or by name: ``mixprec train lm``.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sysconfig
import zlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "lm")
_check_float = functools.partial(check_float, "lm")

__all__ = ["GPT", "Block", "CausalSelfAttention", "MLP", "load_stdlib_bytes", "lm"]

VOCAB_SIZE = 256
SEPARATOR = 0  # NUL: never appears in Python source, marks a file boundary
VAL_MODULUS = 10  # zlib.crc32(path) % VAL_MODULUS == 0 -> validation (about 10% of files)

# --------------------------------------------------------------------------- data


def _stdlib_py_files(root: str) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "__pycache__")]
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        paths.extend(prefix + f for f in filenames if f.endswith(".py"))
    paths.sort()
    return paths


def _is_validation(rel_path: str) -> bool:
    return zlib.crc32(rel_path.encode("utf-8")) % VAL_MODULUS == 0


@functools.lru_cache(maxsize=8)
def _load(root: str, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    paths = _stdlib_py_files(root)
    if not paths:
        raise UsageError(
            f"no .py files found under the standard library directory {root!r}; "
            "the lm recipe needs the Python standard library sources"
        )
    train, val = bytearray(), bytearray()
    total = 0
    for rel in paths:
        if total >= max_bytes:
            break
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read(max_bytes - total)
        if not data:
            continue
        dest = val if _is_validation(rel) else train
        if dest:
            dest.append(SEPARATOR)
        dest += data
        total += len(data)

    def to_tokens(buf: bytearray) -> torch.Tensor:
        if not buf:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(buf, dtype=torch.uint8).long()

    return to_tokens(train), to_tokens(val)


def load_stdlib_bytes(max_bytes: int = 2_000_000, *, root: str | os.PathLike | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) 1-D ``torch.long`` byte tokens from the standard library's ``.py`` files.

    At most ``max_bytes`` bytes of source are read (separators not counted). ``root``
    defaults to ``sysconfig.get_paths()["stdlib"]``. The result is cached per process
    and shared between callers: treat the tensors as read-only.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes <= 0:
        raise UsageError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    root = os.fspath(root) if root is not None else sysconfig.get_paths()["stdlib"]
    return _load(str(root), int(max_bytes))


# --------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT: ``forward(idx: LongTensor (B, T)) -> logits (B, T, 256)``."""

    def __init__(self, n_layer: int = 2, n_head: int = 4, d_model: int = 256,
                 seq_len: int = 128, dropout: float = 0.0, vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)  # not tied to tok_emb
        self.register_buffer("pos", torch.arange(seq_len), persistent=False)

        # GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2L).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len={self.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(self.pos[:T]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------- task


def lm(n_layer: int = 2, n_head: int = 4, d_model: int = 256, seq_len: int = 128,
       batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.1,
       dropout: float = 0.0, max_bytes: int = 2_000_000, eval_batches: int = 8) -> Task:
    """The ``lm`` Task: byte-level GPT on the standard library's source (see module doc)."""
    for name, value in [("n_layer", n_layer), ("n_head", n_head), ("d_model", d_model),
                        ("seq_len", seq_len), ("batch_size", batch_size),
                        ("max_bytes", max_bytes), ("eval_batches", eval_batches)]:
        _check_int(name, value)
    if d_model % n_head != 0:
        raise UsageError(
            f"lm: d_model={d_model} must be divisible by n_head={n_head}; valid n_head "
            f"for this d_model: {[h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]}"
        )
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("dropout", dropout, low=0.0, low_inclusive=True, high=1.0)

    train_tokens, val_tokens = load_stdlib_bytes(max_bytes)
    for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < seq_len + 1:
            raise UsageError(
                f"lm: max_bytes={max_bytes} gives only {len(tokens)} {split} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}; raise max_bytes or lower seq_len"
            )
    offsets = torch.arange(seq_len + 1)

    def crops(tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = tokens[starts[:, None] + offsets]  # (B, seq_len + 1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def build_model() -> nn.Module:
        return GPT(n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=seq_len,
                   dropout=dropout)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        high = len(train_tokens) - seq_len
        while True:
            starts = torch.randint(0, high, (batch_size,), generator=gen)
            yield crops(train_tokens, starts)

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        device = next(model.parameters()).device
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))

    # Fixed validation crops, evenly spaced over the validation split.
    n_crops = eval_batches * batch_size
    val_starts = torch.linspace(0, len(val_tokens) - seq_len - 1, n_crops).long()
    val_batches = [crops(val_tokens, s) for s in val_starts.split(batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                total = sum(loss(model, b) for b in val_batches)
            val_loss = float(total) / len(val_batches)  # one host sync
        finally:
            for m, was_training in modes:
                m.training = was_training
        try:
            perplexity = math.exp(val_loss)
        except OverflowError:
            perplexity = math.inf
        return {"val_loss": val_loss, "perplexity": perplexity}

    return Task(name="lm", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="lm",
    factory=lm,
    domain="language model",
    model="GPT-style byte-level decoder (2 layers, d_model 256, 4 heads, untied lm_head)",
    data="Python standard library .py sources (bytes), split by file",
    metric="val_loss (cross-entropy, nats/byte), perplexity",
    description="Next-byte prediction on Python's own source code; no downloads.",
    metric_key="val_loss",
    higher_is_better=False,
    expected_fp32=(2.4, 2.8),
    verify_steps=100,
    tiny=dict(n_layer=1, n_head=4, d_model=64, seq_len=64, batch_size=8, eval_batches=2),
)
