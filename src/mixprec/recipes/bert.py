"""The ``bert`` recipe: a stock Hugging Face BERT classifying which stdlib package a snippet is from.

What it is
    ``transformers.BertForSequenceClassification`` built from a ``transformers.BertConfig``
    (no download, no tokenizer files, no weights: random init by transformers itself), with
    ``attn_implementation="sdpa"``. The model code is transformers', untouched: the recipe
    proves that mixprec trains third-party model code it did not write. The loss is computed
    here, not by the model: the model is called with ``input_ids`` and ``attention_mask``
    only, and the loss is ``F.cross_entropy(logits.float(), labels)``, in fp32 under autocast.

The data
    The ``.py`` files of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and ``__pycache__``,
    through :func:`mixprec.recipes.lm._stdlib_py_files`). Each file goes to the validation
    split when ``zlib.crc32(relative_path) % 10 == 0`` and to training otherwise, as in the
    ``lm`` recipe: the split is by file, so no file contributes to both.

    Classes: the top-level *packages* (directories with an ``__init__.py``) of the stdlib,
    ranked by their total ``.py`` bytes (largest first, ties by name). ``test`` (CPython's
    regression suite, whose ``test_<pkg>`` subpackages mirror the other packages) is left
    out, and so is any package whose validation split has fewer than 2 files or fewer than
    16 KiB (a class needs a validation set of more than one file). The first ``n_classes``
    (default 8) are the labels; on CPython 3.11 they are, in label order::

        0 encodings  1 idlelib  2 unittest  3 distutils  4 lib2to3  5 asyncio  6 email  7 xml

    (``tkinter`` ranks 6th by size but has 1 validation file of 4 KB, so it is skipped.)
    Another Python version gives another list (``distutils`` is gone in 3.12): the rule is
    the contract, :func:`load_stdlib_packages` returns the names.

    A snippet is a window of ``seq_len - 2`` bytes from one file (files shorter than that
    give one shorter, padded window). Tokens: the 256 byte values, then the specials
    ``[PAD]=256, [CLS]=257, [SEP]=258, [MASK]=259`` (vocab 260); an input is
    ``[CLS] bytes [SEP] [PAD]...`` with ``attention_mask`` 0 on the padding. Training batches
    draw each label uniformly at random, then a window uniformly among all windows of that
    class's training files, so the classes are balanced whatever their sizes. Validation is
    fixed: ``eval_per_class`` windows per class, evenly spaced over that class's validation
    windows. Chance level (and the majority-class baseline) is therefore ``1/n_classes``:
    12.5% accuracy and a loss of ln 8 = 2.08 at the defaults.

Model size and choices
    2 layers, hidden 256, 4 heads, FFN 1024, seq_len 128, batch 32: big enough that the
    matmuls dominate the step (so bf16 gains), small enough for ``mixprec verify`` on two
    CPU cores. Dropout is 0 by default: the runs are short (``verify_steps`` steps see
    about 0.5 MB of the 5 MB of training text, well under one epoch), so there is nothing
    to regularize, and dropout would only add run-to-run noise to the noise floor.
    AdamW, lr 5e-4 with a linear warm-up over the first ``warmup_steps`` steps (BERT's own
    recipe; see "Numerics"), weight decay 0.01 on matrices only, betas (0.9, 0.999).

Numerics
    MEASURED_NUMERICS_PLACEHOLDER

Expected numbers (fp32, defaults, seed 0; 2-core AMD EPYC with AVX512_BF16, torch 2.13,
transformers 5.24, CPython 3.11 stdlib)
    MEASURED_FP32_PLACEHOLDER

Optional masked-LM objective
    ``objective="mlm"`` trains ``BertForMaskedLM`` (same encoder sizes) on the same windows
    with BERT's masking (15% of the byte tokens chosen; of those 80% become ``[MASK]``, 10%
    a random byte, 10% unchanged) and the loss on the chosen positions only;
    ``evaluate`` then gives ``val_loss`` and ``accuracy`` (of the masked-byte predictions).
    The recipe's registered metric and expected numbers are for the default
    ``objective="classify"``.

Use it as ``mixprec.recipes.bert.bert(**kwargs)`` or by name: ``mixprec train bert``.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.recipes.lm import _stdlib_py_files
from mixprec.task import Task

_check_int = functools.partial(check_int, "bert")
_check_float = functools.partial(check_float, "bert")

__all__ = ["PAD", "CLS", "SEP", "MASK", "VOCAB_SIZE", "ClassText", "StdlibPackages",
           "load_stdlib_packages", "encode_windows", "score_totals", "accuracy", "add_linear_warmup", "bert"]

# Byte-level vocabulary: 0..255 are the byte values, the specials come after them.
PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260

VAL_MODULUS = 10  # zlib.crc32(path) % VAL_MODULUS == 0 -> validation (as in the lm recipe)
EXCLUDED_PACKAGES = ("test",)  # CPython's regression suite: its test_<pkg> mirror the others
MIN_VAL_FILES = 2
MIN_VAL_BYTES = 16 * 1024
OBJECTIVES = ("classify", "mlm")

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ClassText:
    """The files of one class in one split: ``data`` holds them back to back (uint8);
    file ``i`` is ``data[starts[i] : starts[i] + lengths[i]]``."""

    data: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    paths: tuple[str, ...]

    def window_counts(self, width: int) -> torch.Tensor:
        """Windows of ``width`` bytes per file (a file shorter than that gives one)."""
        return (self.lengths - width + 1).clamp(min=1)


@dataclass(frozen=True)
class StdlibPackages:
    """``names[k]`` is label ``k``; ``train[k]`` / ``val[k]`` its files in each split."""

    names: tuple[str, ...]
    train: tuple[ClassText, ...]
    val: tuple[ClassText, ...]


def _is_validation(rel_path: str) -> bool:
    return zlib.crc32(rel_path.encode("utf-8")) % VAL_MODULUS == 0


def _class_text(root: str, paths: list[str]) -> ClassText:
    chunks = []
    for rel in paths:
        with open(os.path.join(root, rel), "rb") as f:
            chunks.append(f.read())
    lengths = torch.tensor([len(c) for c in chunks], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    buf = bytearray(b"".join(chunks))
    data = torch.frombuffer(buf, dtype=torch.uint8).clone() if buf else torch.empty(0, dtype=torch.uint8)
    return ClassText(data=data, starts=starts, lengths=lengths, paths=tuple(paths))


@functools.lru_cache(maxsize=8)
def _load(root: str, n_classes: int) -> StdlibPackages:
    paths = _stdlib_py_files(root)
    groups: dict[str, list[str]] = {}
    for rel in paths:
        top, sep, _ = rel.partition("/")
        if sep and top not in EXCLUDED_PACKAGES:
            groups.setdefault(top, []).append(rel)
    ranked = []
    for top, files in groups.items():
        if f"{top}/__init__.py" not in files:
            continue  # a directory of scripts, not a package
        sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in files}
        val = [rel for rel in files if _is_validation(rel)]
        # Empty files (many __init__.py) are no snippet: leave them out of both splits.
        val = [rel for rel in val if sizes[rel] > 0]
        train = [rel for rel in files if not _is_validation(rel) and sizes[rel] > 0]
        if len(val) < MIN_VAL_FILES or sum(sizes[r] for r in val) < MIN_VAL_BYTES or not train:
            continue
        ranked.append((-sum(sizes.values()), top, train, val))
    ranked.sort()
    if len(ranked) < n_classes:
        found = ", ".join(top for _, top, _, _ in ranked) or "none"
        raise UsageError(
            f"bert: n_classes={n_classes} but the standard library at {root!r} has only "
            f"{len(ranked)} eligible packages ({found}); lower n_classes"
        )
    chosen = ranked[:n_classes]
    return StdlibPackages(
        names=tuple(top for _, top, _, _ in chosen),
        train=tuple(_class_text(root, train) for _, _, train, _ in chosen),
        val=tuple(_class_text(root, val) for _, _, _, val in chosen),
    )


def load_stdlib_packages(n_classes: int = 8, *, root: str | os.PathLike | None = None) -> StdlibPackages:
    """The ``n_classes`` largest eligible stdlib packages, split by file (see module doc).

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Cached per process and shared
    between callers: treat the tensors as read-only.
    """
    _check_int("n_classes", n_classes, minimum=2)
    root = os.fspath(root) if root is not None else sysconfig.get_paths()["stdlib"]
    return _load(str(root), int(n_classes))


def encode_windows(windows: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] bytes [SEP] [PAD]...`` per window: ``(input_ids, attention_mask)``, both
    ``(len(windows), seq_len)`` int64; each window holds at most ``seq_len - 2`` bytes."""
    ids = torch.full((len(windows), seq_len), PAD, dtype=torch.long)
    ids[:, 0] = CLS
    for i, w in enumerate(windows):
        n = len(w)
        if n > seq_len - 2:
            raise ValueError(f"a window of {n} bytes does not fit seq_len={seq_len} with [CLS] and [SEP]")
        ids[i, 1:1 + n] = w
        ids[i, 1 + n] = SEP
    return ids, (ids != PAD).long()


def _window(text: ClassText, cum: torch.Tensor, index: int, width: int) -> torch.Tensor:
    """Window number ``index`` (0 <= index < cum[-1]) of ``text``'s windows of ``width`` bytes."""
    f = int(torch.searchsorted(cum, index, right=True))
    offset = index - (int(cum[f - 1]) if f > 0 else 0)
    start = int(text.starts[f]) + offset
    n = min(width, int(text.lengths[f]))
    return text.data[start:start + n].long()


def score_totals(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed cross-entropy, number correct)`` of ``logits (N, C)`` against ``labels (N,)``,
    as 0-dim tensors on the logits' device (no host sync); rows labelled -100 are ignored."""
    logits = logits.float()
    keep = labels != -100
    loss_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & keep).sum()
    return loss_sum, correct


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the rows not labelled -100 whose argmax equals the label."""
    count = int((labels != -100).sum())
    if count == 0:
        raise ValueError("accuracy of no labelled rows")
    return float(score_totals(logits, labels)[1]) / count


def add_linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
    """Linear lr warm-up inside the optimizer: step ``t`` (1-based) runs at
    ``lr * min(1, t / warmup_steps)``.

    The Task contract has one optimizer and no scheduler, so the schedule lives in the
    optimizer: a step pre-hook (``Optimizer.register_step_pre_hook``) counts the steps in
    each param group (``group["warmup_step"]``, next to ``group["base_lr"]``), where
    ``state_dict()`` saves them, so a resumed run continues the schedule exactly. A step the
    loss scaler skips never calls ``step()``, so it does not advance the schedule either.
    """
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
        group["warmup_step"] = 0

    def pre_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        for group in opt.param_groups:
            group["warmup_step"] += 1
            group["lr"] = group["base_lr"] * min(1.0, group["warmup_step"] / warmup_steps)

    optimizer.register_step_pre_hook(pre_step)


# --------------------------------------------------------------------------- argument checks


# --------------------------------------------------------------------------- task


def bert(n_layer: int = 2, n_head: int = 4, hidden: int = 128, intermediate: int | None = None,
         seq_len: int = 128, batch_size: int = 32, lr: float = 5e-4, warmup_steps: int = 20,
         weight_decay: float = 0.01, dropout: float = 0.0, init_std: float = 0.1,
         n_classes: int = 8, eval_per_class: int = 256, objective: str = "classify",
         mask_prob: float = 0.15, attn_implementation: str = "sdpa") -> Task:
    """The ``bert`` Task: stock HF BERT classifying stdlib snippets by package (see module doc)."""
    for name, value in [("n_layer", n_layer), ("n_head", n_head), ("hidden", hidden),
                        ("batch_size", batch_size), ("eval_per_class", eval_per_class)]:
        _check_int(name, value)
    _check_int("seq_len", seq_len, minimum=4)
    _check_int("n_classes", n_classes, minimum=2)
    _check_int("warmup_steps", warmup_steps, minimum=0)
    if intermediate is None:
        intermediate = 4 * hidden
    _check_int("intermediate", intermediate)
    if hidden % n_head != 0:
        raise UsageError(
            f"bert: hidden={hidden} must be divisible by n_head={n_head}; valid n_head "
            f"for this hidden: {[h for h in range(1, min(hidden, 64) + 1) if hidden % h == 0]}"
        )
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("dropout", dropout, low=0.0, low_inclusive=True, high=1.0)
    _check_float("init_std", init_std, low=0.0, low_inclusive=False)
    _check_float("mask_prob", mask_prob, low=0.0, low_inclusive=False, high=1.0)
    if objective not in OBJECTIVES:
        raise UsageError(f"bert: objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise UsageError(f"bert: attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")

    from transformers import BertConfig  # imported here: listing recipes stays light

    packages = load_stdlib_packages(n_classes)
    width = seq_len - 2  # bytes per window, between [CLS] and [SEP]
    train_cums = [torch.cumsum(t.window_counts(width), 0) for t in packages.train]
    config = BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, intermediate_size=intermediate,
        max_position_embeddings=seq_len, type_vocab_size=1, pad_token_id=PAD,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        initializer_range=init_std, num_labels=n_classes,
        attn_implementation=attn_implementation,
    )
    mlm = objective == "mlm"

    def draw(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, n_classes, (n,), generator=gen)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        windows = []
        for k, x in zip(labels.tolist(), u.tolist()):
            cum = train_cums[k]
            index = min(int(x * int(cum[-1])), int(cum[-1]) - 1)
            windows.append(_window(packages.train[k], cum, index, width))
        ids, mask = encode_windows(windows, seq_len)
        return ids, mask, labels

    def mask_tokens(ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of the byte tokens: (masked input_ids, targets with -100 elsewhere)."""
        is_byte = ids < 256
        chosen = (torch.rand(ids.shape, generator=gen) < mask_prob) & is_byte
        # At least one target per row, so no row has an empty loss.
        first = torch.zeros_like(chosen)
        first[:, 1] = True
        chosen |= first & ~chosen.any(1, keepdim=True)
        targets = torch.where(chosen, ids, torch.full_like(ids, -100))
        r = torch.rand(ids.shape, generator=gen)
        random_bytes = torch.randint(0, 256, ids.shape, generator=gen)
        out = torch.where(chosen & (r < 0.8), torch.full_like(ids, MASK), ids)
        out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_bytes, out)
        return out, targets

    def build_model() -> nn.Module:
        from transformers import BertForMaskedLM, BertForSequenceClassification

        return (BertForMaskedLM if mlm else BertForSequenceClassification)(config)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
        if warmup_steps > 0:
            add_linear_warmup(opt, warmup_steps)
        return opt

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            ids, mask, labels = draw(gen, batch_size)
            if mlm:
                ids, labels = mask_tokens(ids, gen)
            yield ids, mask, labels

    def forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask, labels = batch
        device = next(model.parameters()).device
        ids = ids.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if mlm:
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        return F.cross_entropy(logits, labels, ignore_index=-100), logits, labels

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return forward(model, batch)[0]

    # Fixed validation windows: eval_per_class per class, evenly spaced over its windows.
    val_windows, val_labels = [], []
    for k, text in enumerate(packages.val):
        cum = torch.cumsum(text.window_counts(width), 0)
        n = int(cum[-1])
        for index in torch.linspace(0, n - 1, eval_per_class).round().long().tolist():
            val_windows.append(_window(text, cum, index, width))
            val_labels.append(k)
    val_ids, val_mask = encode_windows(val_windows, seq_len)
    val_y = torch.tensor(val_labels, dtype=torch.long)
    if mlm:
        val_ids, val_y = mask_tokens(val_ids, torch.Generator().manual_seed(1234))
    val_count = int((val_y != -100).sum())
    val_batches = list(zip(val_ids.split(batch_size), val_mask.split(batch_size), val_y.split(batch_size)))

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                totals = [score_totals(*forward(model, batch)[1:]) for batch in val_batches]
                loss_sum = torch.stack([t[0] for t in totals]).sum().double()
                correct = torch.stack([t[1] for t in totals]).sum().double()
                loss_sum, correct = torch.stack([loss_sum, correct]).tolist()  # one host sync
        finally:
            for m, was_training in modes:
                m.training = was_training
        return {"accuracy": correct / val_count, "val_loss": loss_sum / val_count}

    return Task(name="bert", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="bert",
    factory=bert,
    domain="text classification (third-party model)",
    model="Hugging Face BertForSequenceClassification from a BertConfig (2 layers, hidden 128, "
          "4 heads, byte vocabulary + [PAD]/[CLS]/[SEP]/[MASK]), SDPA attention",
    data="Python standard library .py sources: byte windows labelled by top-level package "
         "(the 8 largest eligible), split by file",
    metric="accuracy (8 balanced classes, chance 12.5%), val_loss (cross-entropy, nats)",
    description="Stock transformers BERT classifying which stdlib package a 126-byte snippet "
                "comes from; no downloads, no tokenizer files.",
    metric_key="accuracy",
    higher_is_better=True,
    expected_fp32=(0.25, 0.40),
    verify_steps=200,
    tiny=dict(n_layer=1, n_head=2, hidden=32, seq_len=32, batch_size=8, eval_per_class=4),
    tiny_steps=10,
)
