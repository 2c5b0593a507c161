"""The ``recsys`` recipe: a DLRM-style click-through-rate model on synthetic click logs.

What it is
    DLRM (Naumov et al., 2019): 13 dense features go through a bottom MLP
    (13-256-128-16, ReLU); 8 categorical features go through one ``nn.EmbeddingBag``
    (``mode="sum"``, dim 16) each, fed with 2-D ``(B, hotness)`` multi-hot ids; the dot
    products of every pair of the 9 resulting vectors (the upper triangle of ``Z Z^T``, 36
    values, one ``bmm``) are concatenated with the dense vector into a top MLP
    (52-512-256-1) ending in one click logit. The loss is BCE-with-logits on
    ``logit.float()``. Tables have 200k, 20k, 5k, 1k, 500, 100, 50 and 10 rows (hotness
    1, 3, 1, 2, 1, 1, 1, 1): 3.63M of the model's 3.82M parameters, so the training state
    (weights, gradients, Adam moments: 61 MB in fp32) is almost all embedding table,
    which ``mixprec.memory`` shows (the large-table memory effect); the mixed modes keep
    fp32 parameters, so their state is the same 61 MB (measured ratio 1.00x), and only the
    activations shrink (0.59x in bf16-mixed).

The data
    Synthetic click logs from a known latent-factor model, generated with numpy from a
    fixed seed (``DATA_SEED``, independent of the training seed), 524,288 training and
    32,768 validation rows, a few seconds to generate (cached per process). Each table's ids
    are drawn with Zipf frequencies (p(rank r) ~ r^-1.1, ranks shuffled to ids); every id
    has a hidden 4-dim latent vector, a multi-hot feature's vector is the sum of its ids'.
    The true click probability is sigmoid(bias + sum over feature pairs of the latent dot
    products + w . dense), with the pairwise term scaled to std 1.5, the dense term of
    std 1 and bias -1; clicks are Bernoulli draws (CTR 0.32). Skewed ids make the head
    learnable and the tail not: of the 200k-row table's ids, 60k occur in the training
    rows, 37k of them once; 7% of its validation lookups are ids never seen in training.

Metric
    ``auc`` (ROC AUC of the validation logits; chance 0.5, higher is better) and
    ``logloss`` (mean BCE, nats; predicting the base rate gives 0.625). The ceiling is the
    generating model itself: :func:`bayes_auc` computes the AUC of the true click
    probabilities on the validation rows, 0.856 at the defaults (its logloss is 0.425).
    It does not depend on the model, so it is not an ``evaluate()`` key.

Optimizer: measured, then chosen
    Dense gradients with one ``torch.optim.Adam(fused=True)``: lr 3e-3 for the MLPs and
    1e-2 for the tables (two parameter groups). The 200k x 16 table dominates the
    optimizer step: fwd + bwd + step of that table alone took 72 ms with fused Adam,
    296 ms with foreach Adam, 257 ms with Adagrad and 1 ms with ``SparseAdam`` on sparse
    gradients (median, 1 thread, busy machine). SparseAdam would be the cheapest, but the
    engine cannot take sparse gradients today (its fp32/bf16 finite check runs
    ``torch._foreach_norm``, which has no sparse kernel, and ``verify``'s gradient
    snapshots ``.flatten()`` them), so the recipe keeps ``sparse=False``; ``fused=False``
    switches to foreach Adam. Learning rates: at 400 steps lr 3e-3 / 1e-2 gave AUC 0.816,
    1e-3 / 1e-2 0.801, 1e-3 / 3e-2 0.812, 3e-3 / 3e-2 0.815, 3e-3 / 1e-1 0.812 (fp32,
    seed 0). Each row is seen at most once in 400 steps of 1024 (410k of 524k rows): when
    epochs repeat, the large table memorizes rows (measured on 262k rows: training loss
    0.49 -> 0.39 within the second epoch while validation logloss rose).

Expected numbers (fp32, defaults, seed 0, 400 steps; 2-core AMD EPYC with AVX512_BF16,
torch 2.13)
    * training loss 0.58 over the first 20 steps, 0.477 over the last fifth; ``evaluate``
      then gives auc 0.816 and logloss 0.473 (seed 1: 0.816 / 0.474). 11.5 s for the 400
      steps (28 ms median step) on a quiet machine, about 21 s for the whole ``mixprec
      train recsys`` (imports and data generation included).
    * Numerics: ``nn.EmbeddingBag`` is not on CPU autocast's lower-precision list, so the
      tables and their sums stay fp32 in bf16-mixed; the MLPs and the interaction ``bmm``
      run in bf16, the loss in fp32. Nothing needed fixing: ``verify --precision
      bf16-mixed --noise-floor`` passes with the final loss 0.00% from fp32 (seed-to-seed
      0.76%) and auc 0.8162 vs 0.8162.
      emulate:fp16-mixed passes too (final loss 0.02% from fp32, auc 0.8163, no skipped
      steps).
    * step time: bf16-mixed 1.30x faster than fp32 (interleaved, quiet machine; 1.46x
      [1.44, 1.49] over 30 rounds in ``verify --all``, docs/results.md); no more,
      because the table's dense gradient and its Adam update are fp32 memory traffic that
      bf16 does not shorten.

Use it as ``mixprec.recipes.recsys.recsys(**kwargs)`` or by name: ``mixprec train recsys``.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "recsys")
_check_float = functools.partial(check_float, "recsys")

__all__ = ["DLRM", "ClickLogs", "bayes_auc", "click_metrics", "generate_click_logs", "recsys"]

DATA_SEED = 20_24  # the click logs' own seed: the same data whatever the training seed
DEFAULT_TABLE_SIZES = (200_000, 20_000, 5_000, 1_000, 500, 100, 50, 10)
DEFAULT_HOTNESS = (1, 3, 1, 2, 1, 1, 1, 1)

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ClickLogs:
    """One split of the synthetic click logs (CPU tensors; treat them as read-only).

    ``dense``: float32 (N, n_dense); ``ids``: one int64 (N, hotness[t]) tensor per table;
    ``clicks``: float32 (N,) in {0, 1}; ``prob``: float64 (N,), the generating model's true
    click probability of each row (what a Bayes-optimal predictor would output).
    """

    dense: torch.Tensor
    ids: tuple[torch.Tensor, ...]
    clicks: torch.Tensor
    prob: torch.Tensor

    def __len__(self) -> int:
        return len(self.clicks)


def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    """CDF over ranks 1..vocab of p(rank r) proportional to r ** -exponent."""
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


@functools.lru_cache(maxsize=4)
def _generate(table_sizes: tuple[int, ...], hotness: tuple[int, ...], n_dense: int, latent_dim: int,
              zipf_exponent: float, interaction_std: float, dense_std: float, bias: float,
              n_train: int, n_val: int) -> tuple[ClickLogs, ClickLogs]:
    rng = np.random.default_rng(DATA_SEED)
    n = n_train + n_val
    # The hidden model: one latent vector per id, a linear dense term, a bias.
    latents = [rng.standard_normal((v, latent_dim)) for v in table_sizes]
    rank_to_id = [rng.permutation(v) for v in table_sizes]  # frequent ids are not simply 0, 1, ...
    w_dense = rng.standard_normal(n_dense) * (dense_std / math.sqrt(n_dense))
    dense = rng.standard_normal((n, n_dense))

    ids = []
    total = np.zeros((n, latent_dim))
    squares = np.zeros(n)
    for v, h, lat, perm in zip(table_sizes, hotness, latents, rank_to_id):
        ranks = np.searchsorted(_zipf_cdf(v, zipf_exponent), rng.random((n, h)), side="right")
        idx = perm[np.minimum(ranks, v - 1)]
        ids.append(idx)
        feat = lat[idx[:, 0]]  # a multi-hot feature is the sum of its ids' vectors (EmbeddingBag "sum")
        for j in range(1, h):
            feat += lat[idx[:, j]]
        total += feat
        squares += np.einsum("ij,ij->i", feat, feat)
    # sum over pairs i < j of <f_i, f_j> = (|sum f|^2 - sum |f|^2) / 2
    pairs = 0.5 * (np.einsum("ij,ij->i", total, total) - squares)
    # Scale the latents (the pairwise term is quadratic in them) to the asked std.
    pairs *= interaction_std / pairs.std()
    logit = bias + pairs + dense @ w_dense
    prob = 1.0 / (1.0 + np.exp(-logit))
    clicks = (rng.random(n) < prob).astype(np.float32)

    def split(sl: slice) -> ClickLogs:
        return ClickLogs(
            dense=torch.from_numpy(dense[sl].astype(np.float32)),
            ids=tuple(torch.from_numpy(np.ascontiguousarray(i[sl]).astype(np.int64)) for i in ids),
            clicks=torch.from_numpy(clicks[sl]),
            prob=torch.from_numpy(prob[sl].copy()),
        )

    return split(slice(0, n_train)), split(slice(n_train, n))


def generate_click_logs(table_sizes: Sequence[int] = DEFAULT_TABLE_SIZES,
                        hotness: Sequence[int] = DEFAULT_HOTNESS, n_dense: int = 13,
                        latent_dim: int = 4, zipf_exponent: float = 1.1,
                        interaction_std: float = 1.5, dense_std: float = 1.0, bias: float = -1.0,
                        n_train: int = 524_288, n_val: int = 32_768) -> tuple[ClickLogs, ClickLogs]:
    """(train, val) click logs from the hidden latent-factor model (see the module doc).

    Deterministic (seed ``DATA_SEED``), cached per process: treat the tensors as read-only.
    """
    return _generate(tuple(int(v) for v in table_sizes), tuple(int(h) for h in hotness), int(n_dense),
                     int(latent_dim), float(zipf_exponent), float(interaction_std), float(dense_std),
                     float(bias), int(n_train), int(n_val))


def bayes_auc(**data_kwargs) -> float:
    """ROC AUC of the generating model's true click probabilities on the validation split:
    the ceiling no model can beat in expectation (keyword arguments as
    :func:`generate_click_logs`)."""
    from sklearn.metrics import roc_auc_score

    _, val = generate_click_logs(**data_kwargs)
    return float(roc_auc_score(val.clicks.numpy(), val.prob.numpy()))


def click_metrics(logits, clicks) -> dict[str, float]:
    """``auc`` (ROC AUC; 0.5 is chance, 1.0 a perfect ranking) and ``logloss`` (mean binary
    cross-entropy in nats, from logits, in float64) of click logits against 0/1 labels."""
    from sklearn.metrics import roc_auc_score

    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(clicks, dtype=np.float64).reshape(-1)
    logloss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    return {"auc": float(roc_auc_score(y, z)), "logloss": logloss}


# --------------------------------------------------------------------------- model


def _mlp(sizes: Sequence[int], final_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019): ``forward(dense (B, n_dense), ids: sequence of (B, h_t)
    LongTensors) -> click logits (B,)``.

    The bottom MLP maps the dense features to one ``embedding_dim`` vector; each table's
    ``EmbeddingBag(mode="sum")`` sums the embeddings of its multi-hot ids; the dot products
    of every pair of these ``1 + n_tables`` vectors (the upper triangle of ``Z Z^T``) are
    concatenated with the dense vector and fed to the top MLP, which ends in one logit.
    """

    def __init__(self, n_dense: int = 13, table_sizes: Sequence[int] = DEFAULT_TABLE_SIZES,
                 embedding_dim: int = 16, bottom_mlp: Sequence[int] = (256, 128),
                 top_mlp: Sequence[int] = (512, 256)):
        super().__init__()
        self.bottom = _mlp([n_dense, *bottom_mlp, embedding_dim], final_relu=True)
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(v, embedding_dim, mode="sum") for v in table_sizes)
        n_vectors = 1 + len(table_sizes)
        li, lj = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        self.top = _mlp([embedding_dim + len(li), *top_mlp, 1], final_relu=False)

        # DLRM's reference init: Linear weights N(0, sqrt(2 / (fan_in + fan_out))), biases
        # N(0, sqrt(1 / fan_out)); embeddings U(-sqrt(1 / rows), sqrt(1 / rows)).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_features + m.out_features)))
                nn.init.normal_(m.bias, 0.0, math.sqrt(1.0 / m.out_features))
            elif isinstance(m, nn.EmbeddingBag):
                bound = math.sqrt(1.0 / m.num_embeddings)
                nn.init.uniform_(m.weight, -bound, bound)

    def forward(self, dense: torch.Tensor, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(ids) != len(self.embeddings):
            raise ValueError(f"expected {len(self.embeddings)} id tensors (one per table), got {len(ids)}")
        x = self.bottom(dense)
        vectors = [x] + [emb(i).to(x.dtype) for emb, i in zip(self.embeddings, ids)]
        z = torch.stack(vectors, dim=1)  # (B, 1 + n_tables, d)
        interactions = torch.bmm(z, z.transpose(1, 2))[:, self.li, self.lj]
        return self.top(torch.cat([x, interactions], dim=1)).squeeze(1)


# --------------------------------------------------------------------------- task


def _check_sizes(name: str, value, minimum: int = 1) -> tuple[int, ...]:
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= minimum for v in value)
    if not ok:
        raise UsageError(f"recsys: {name} must be a non-empty tuple of integers >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def recsys(table_sizes: Sequence[int] = DEFAULT_TABLE_SIZES, hotness: Sequence[int] = DEFAULT_HOTNESS,
           n_dense: int = 13, embedding_dim: int = 16, bottom_mlp: Sequence[int] = (256, 128),
           top_mlp: Sequence[int] = (512, 256), batch_size: int = 1024, lr: float = 3e-3,
           embedding_lr: float = 1e-2, zipf_exponent: float = 1.1, latent_dim: int = 4,
           interaction_std: float = 1.5, n_train: int = 524_288, n_val: int = 32_768,
           fused: bool = True) -> Task:
    """The ``recsys`` Task: DLRM on synthetic Zipf-skewed click logs (see the module doc)."""
    table_sizes = _check_sizes("table_sizes", table_sizes, minimum=2)
    hotness = _check_sizes("hotness", hotness)
    if len(hotness) != len(table_sizes):
        raise UsageError(f"recsys: hotness={hotness!r} must give one value per table "
                         f"({len(table_sizes)} tables in table_sizes={table_sizes!r})")
    bottom_mlp = _check_sizes("bottom_mlp", bottom_mlp) if bottom_mlp != () else ()
    top_mlp = _check_sizes("top_mlp", top_mlp) if top_mlp != () else ()
    for name, value in [("n_dense", n_dense), ("embedding_dim", embedding_dim), ("batch_size", batch_size),
                        ("latent_dim", latent_dim), ("n_train", n_train), ("n_val", n_val)]:
        _check_int(name, value)
    if n_val < 2:
        raise UsageError(f"recsys: n_val must be at least 2 (AUC needs clicks and non-clicks), got {n_val!r}")
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("embedding_lr", embedding_lr, low=0.0, low_inclusive=False)
    _check_float("zipf_exponent", zipf_exponent, low=0.0, low_inclusive=True)
    _check_float("interaction_std", interaction_std, low=0.0, low_inclusive=False)
    if not isinstance(fused, bool):
        raise UsageError(f"recsys: fused must be True or False, got {fused!r}")

    train, val = generate_click_logs(table_sizes, hotness, n_dense=n_dense, latent_dim=latent_dim,
                                     zipf_exponent=zipf_exponent, interaction_std=interaction_std,
                                     n_train=n_train, n_val=n_val)
    if val.clicks.min() == val.clicks.max():
        raise UsageError(f"recsys: n_val={n_val} gives a validation set with one class only; raise n_val")

    def build_model() -> nn.Module:
        return DLRM(n_dense, table_sizes, embedding_dim, bottom_mlp, top_mlp)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        tables = [p for name, p in model.named_parameters() if name.startswith("embeddings.")]
        ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": dense, "lr": lr}, {"params": tables, "lr": embedding_lr}],
                                lr=lr, fused=fused)

    def take(data: ClickLogs, rows: torch.Tensor):
        return data.dense[rows], tuple(i[rows] for i in data.ids), data.clicks[rows]

    def train_batches(seed: int) -> Iterator:
        gen = torch.Generator().manual_seed(int(seed))
        while True:  # epochs of a fresh permutation each; a last partial batch is dropped
            order = torch.randperm(len(train), generator=gen)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield take(train, order[start:start + batch_size])

    def loss(model: nn.Module, batch) -> torch.Tensor:
        dense, ids, clicks = batch
        device = next(model.parameters()).device
        logits = model(dense.to(device, non_blocking=True), [i.to(device, non_blocking=True) for i in ids])
        return F.binary_cross_entropy_with_logits(logits.float(), clicks.to(device, non_blocking=True))

    eval_chunk = 8192
    val_rows = torch.arange(len(val)).split(eval_chunk)

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                logits = torch.cat([model(d.to(device), [i.to(device) for i in ids]).float()
                                    for d, ids, _ in (take(val, r) for r in val_rows)])
            logits = logits.cpu().numpy()  # one host sync
        finally:
            for m, was_training in modes:
                m.training = was_training
        return click_metrics(logits, val.clicks.numpy())

    return Task(name="recsys", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="recsys",
    factory=recsys,
    domain="recommendation",
    model="DLRM: bottom MLP, 8 EmbeddingBag tables (largest 200k rows), dot interactions, top MLP",
    data="synthetic click logs from a hidden latent-factor model, Zipf-skewed ids",
    metric="auc (ROC AUC on a fixed validation set), logloss",
    description="Click-through-rate prediction with large embedding tables; no downloads.",
    metric_key="auc",
    higher_is_better=True,
    expected_fp32=(0.80, 0.83),
    verify_steps=400,
    tiny=dict(table_sizes=(1000, 50, 10), hotness=(1, 2, 1), embedding_dim=8, bottom_mlp=(32,),
              top_mlp=(32,), batch_size=256, n_train=16384, n_val=2048, lr=1e-2, embedding_lr=5e-2),
    tiny_steps=30,
)
