"""The ``detection`` recipe: a single-shot, YOLO-style digit detector on composed scenes.

What it is
    A small fully convolutional detector. Backbone: six 3x3 conv + BatchNorm + ReLU layers
    (``width`` channels at stride 2, ``2 width`` at stride 4, ``4 width`` at stride 8, with
    one stride-1 conv at each of strides 2, 4 and 8) to a feature grid of stride 8 (8x8
    cells on a 64x64 scene), a 3x3 conv + BatchNorm + ReLU head layer, then a 1x1 conv that
    predicts per cell 1 objectness logit, 10 class logits and 4 box numbers.

    Assignment (YOLO-style, one anchor per cell): an object belongs to the cell that holds
    its box centre. Scenes are composed so that two objects never share a cell (their
    squares do not overlap and are at least 16 px wide, so their centres lie at least 16 px
    apart on one axis). The box of a positive cell is coded as ``(cx / 8 - col, cy / 8 - row,
    log(w / anchor), log(h / anchor))`` with ``anchor = (min_size + max_size) / 2`` pixels.

    Losses (all on ``.float()`` outputs, each normalized by the number of objects in the
    batch): objectness, a focal binary cross-entropy (gamma 2, no alpha weighting) over every
    cell; class, cross-entropy over the 10 digits on the positive cells; box, smooth L1
    (beta 0.1) of the four coded numbers on the positive cells. The objectness bias starts
    at logit(0.01), as in RetinaNet, so the many empty cells do not swamp the first steps.

    Decoding: the score of class ``c`` in a cell is ``sigmoid(objectness) * softmax(class)_c``;
    every (cell, class) with score >= ``score_threshold`` is a candidate; per-class greedy
    NMS at IoU 0.5 per scene, then the ``max_detections`` best per scene.

The data
    Scenes composed from scikit-learn's bundled 8x8 digit scans
    (:mod:`mixprec.recipes.digits`): each ``canvas`` x ``canvas`` scene (black background)
    holds 1 to ``max_digits`` digits, each bilinearly upsampled to a random square size in
    ``[min_size, max_size]`` px and pasted at a random position (pixel-wise max) where its
    square does not overlap the squares already placed (a digit that finds no free place in
    50 tries is left out). The ground-truth box is the digit's tight ink box (pixels > 0.2)
    and its class the digit. The training pool (``train_scenes`` scenes, from the 1,437
    training digits) and the validation set (``val_scenes`` scenes, from the 360 validation
    digits) are drawn from ``numpy.random.default_rng`` with fixed data seeds, independent of
    the training seed; training batches are drawn from the pool with replacement by a
    ``torch.Generator`` seeded with the run's seed.

The metric
    ``map50``: mean over the digit classes present in the validation scenes of the VOC-style
    all-point interpolated average precision at IoU 0.5 (:mod:`mixprec.recipes.boxes`);
    ``val_loss``: the training loss on the validation scenes. A detector that puts random
    boxes at random cells scores about 0.0 mAP (a box of the right class and IoU >= 0.5 is
    rare), and one that knows where the digits are but guesses their class about 0.1.

Expected numbers (fp32, defaults, seed 0; 2-core AMD EPYC with AVX512_BF16, torch 2.13)
    * after ``verify_steps`` = 300 steps (``mixprec verify --all``, docs/results.md):
      map50 0.991 (seed 0) and 0.976 (seed 1); median fp32 step about 56 ms, 300 steps in
      about 17 s. bf16-mixed 0.990 (1.52x faster [1.49, 1.58]), emulated fp16 0.993 (2 steps skipped
      by the loss scaler at the start, as expected), fp8-mixed 0.990: the detector is
      convolutional and torchao converts only ``nn.Linear`` layers, so fp8-mixed trains as
      bf16-mixed here.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "detection")
_check_float = functools.partial(check_float, "detection")

__all__ = ["Detector", "Scenes", "make_scenes", "encode_targets", "detection_loss", "decode", "detection"]

NUM_CLASSES = 10
STRIDE = 8
INK = 0.2  # a pixel is ink above this (digit pixels are in [0, 1])
MAX_TRIES = 50  # placements tried per digit before it is left out of the scene
TRAIN_DATA_SEED = 1234
VAL_DATA_SEED = 4321
BOX_CHANNELS = 4
OUT_CHANNELS = 1 + NUM_CLASSES + BOX_CHANNELS
OBJ_PRIOR = 0.01
FOCAL_GAMMA = 2.0
BOX_BETA = 0.1

# --------------------------------------------------------------------------- data


class Scenes:
    """Composed scenes: ``images float32 (N, 1, S, S)``, ``boxes float32 (N, K, 4)`` and
    ``labels int64 (N, K)`` padded to ``K = max_digits`` with label -1."""

    def __init__(self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        self.images, self.boxes, self.labels = images, boxes, labels

    def __len__(self) -> int:
        return len(self.images)

    def ground_truth(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per scene ``(boxes (k, 4), labels (k,))`` without the padding."""
        out = []
        for b, l in zip(self.boxes.numpy(), self.labels.numpy()):
            keep = l >= 0
            out.append((b[keep].astype(np.float64), l[keep]))
        return out


def _ink_boxes(patches: np.ndarray) -> np.ndarray:
    """Tight ink boxes ``int64 (M, 4)`` of ``(M, s, s)`` patches (the whole square if no ink)."""
    m, s, _ = patches.shape
    ink = patches > INK
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (M, s) each
    out = np.empty((m, 4), dtype=np.int64)
    out[:, 0], out[:, 1] = cols.argmax(axis=1), rows.argmax(axis=1)
    out[:, 2], out[:, 3] = s - cols[:, ::-1].argmax(axis=1), s - rows[:, ::-1].argmax(axis=1)
    empty = ~rows.any(axis=1)
    out[empty] = (0, 0, s, s)
    return out


def make_scenes(digits: torch.Tensor, digit_labels: torch.Tensor, n: int, *, seed: int,
                canvas: int = 64, max_digits: int = 4, min_size: int = 16, max_size: int = 28
                ) -> Scenes:
    """``n`` scenes from ``digits (M, 1, 8, 8)`` in [0, 1], drawn from ``default_rng(seed)``
    (see the module doc)."""
    from mixprec.recipes.digits import upsample

    rng = np.random.default_rng(seed)
    scaled = {s: upsample(digits, s)[:, 0].numpy() for s in range(min_size, max_size + 1)}
    ink = {s: _ink_boxes(p) for s, p in scaled.items()}
    labels_np = digit_labels.numpy()
    images = np.zeros((n, canvas, canvas), dtype=np.float32)
    boxes = np.zeros((n, max_digits, 4), dtype=np.float32)
    labels = np.full((n, max_digits), -1, dtype=np.int64)
    counts = rng.integers(1, max_digits + 1, size=n)
    for i in range(n):
        squares = np.zeros((0, 3), dtype=np.int64)  # (x0, y0, size) of the digits placed
        for _ in range(int(counts[i])):
            # MAX_TRIES candidate squares at once; the first that overlaps no placed square wins.
            sizes = rng.integers(min_size, max_size + 1, size=MAX_TRIES)
            xy = rng.integers(0, canvas - sizes[:, None] + 1, size=(MAX_TRIES, 2))
            d = int(rng.integers(len(labels_np)))
            qx, qy, qs = squares[:, 0], squares[:, 1], squares[:, 2]
            x0, y0, sz = xy[:, :1], xy[:, 1:], sizes[:, None]
            apart = (x0 >= qx + qs) | (qx >= x0 + sz) | (y0 >= qy + qs) | (qy >= y0 + sz)
            free = np.nonzero(apart.all(axis=1))[0]
            if len(free) == 0:
                continue
            t = free[0]
            s, x, y = int(sizes[t]), int(xy[t, 0]), int(xy[t, 1])
            region = images[i, y:y + s, x:x + s]
            np.maximum(region, scaled[s][d], out=region)
            k = len(squares)
            boxes[i, k] = ink[s][d] + (x, y, x, y)
            labels[i, k] = labels_np[d]
            squares = np.concatenate([squares, [(x, y, s)]])
    return Scenes(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(boxes),
                  torch.from_numpy(labels))


def encode_targets(scenes: Scenes, canvas: int, anchor: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell training targets: ``objectness float32 (N, G, G)`` (1 at an object's centre
    cell), ``classes int64 (N, G, G)`` (-1 where no object) and ``box float32 (N, 4, G, G)``
    (coded as in the module doc, 0 where no object), with ``G = canvas // 8``."""
    g = canvas // STRIDE
    n = len(scenes)
    b, l = scenes.boxes.numpy().astype(np.float64), scenes.labels.numpy()
    i, k = np.nonzero(l >= 0)
    b = b[i, k]
    cx, cy = (b[:, 0] + b[:, 2]) / 2 / STRIDE, (b[:, 1] + b[:, 3]) / 2 / STRIDE
    col, row = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
    cell = (i * g + row) * g + col
    if len(np.unique(cell)) != len(cell):
        raise ValueError("two objects of one scene share a grid cell")
    obj = np.zeros((n, g, g), dtype=np.float32)
    cls = np.full((n, g, g), -1, dtype=np.int64)
    box = np.zeros((n, g, g, BOX_CHANNELS), dtype=np.float32)
    obj[i, row, col] = 1.0
    cls[i, row, col] = l[i, k]
    box[i, row, col] = np.stack([cx - col, cy - row, np.log((b[:, 2] - b[:, 0]) / anchor),
                                 np.log((b[:, 3] - b[:, 1]) / anchor)], axis=1)
    return (torch.from_numpy(obj), torch.from_numpy(cls),
            torch.from_numpy(box).permute(0, 3, 1, 2).contiguous())


@functools.lru_cache(maxsize=4)
def _data(canvas: int, max_digits: int, min_size: int, max_size: int, train_scenes: int,
          val_scenes: int):
    from mixprec.recipes.digits import load_digits_split

    train_x, train_y, val_x, val_y = load_digits_split()
    geometry = dict(canvas=canvas, max_digits=max_digits, min_size=min_size, max_size=max_size)
    train = make_scenes(train_x, train_y, train_scenes, seed=TRAIN_DATA_SEED, **geometry)
    val = make_scenes(val_x, val_y, val_scenes, seed=VAL_DATA_SEED, **geometry)
    anchor = (min_size + max_size) / 2
    return train, encode_targets(train, canvas, anchor), val, encode_targets(val, canvas, anchor)


# --------------------------------------------------------------------------- model


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Detector(nn.Module):
    """``forward(images (B, 1, S, S)) -> (B, 15, S / 8, S / 8)``: per cell, channel 0 the
    objectness logit, 1..10 the class logits, 11..14 the coded box."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(
            _conv_bn_relu(1, width, 2), _conv_bn_relu(width, width),
            _conv_bn_relu(width, 2 * width, 2), _conv_bn_relu(2 * width, 2 * width),
            _conv_bn_relu(2 * width, 4 * width, 2), _conv_bn_relu(4 * width, 4 * width),
        )
        self.neck = _conv_bn_relu(4 * width, 4 * width)
        self.head = nn.Conv2d(4 * width, OUT_CHANNELS, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[0] = -math.log((1 - OBJ_PRIOR) / OBJ_PRIOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def detection_loss(out: torch.Tensor, obj_t: torch.Tensor, cls_t: torch.Tensor, box_t: torch.Tensor
                   ) -> torch.Tensor:
    """The loss of the module doc; ``out`` is the model's output (cast to fp32 here)."""
    out = out.float()
    obj_logit, cls_logit, box = out[:, 0], out[:, 1:1 + NUM_CLASSES], out[:, 1 + NUM_CLASSES:]
    pos = obj_t  # 1.0 at positive cells
    n_pos = pos.sum().clamp(min=1.0)
    p = torch.sigmoid(obj_logit)
    p_t = p * obj_t + (1 - p) * (1 - obj_t)
    bce = F.binary_cross_entropy_with_logits(obj_logit, obj_t, reduction="none")
    l_obj = ((1 - p_t).pow(FOCAL_GAMMA) * bce).sum()
    l_cls = (F.cross_entropy(cls_logit, cls_t.clamp(min=0), reduction="none") * pos).sum()
    l_box = (F.smooth_l1_loss(box, box_t, beta=BOX_BETA, reduction="none").sum(1) * pos).sum()
    return (l_obj + l_cls + l_box) / n_pos


def decode(out: np.ndarray, anchor: float, score_threshold: float = 0.01,
           iou_threshold: float = 0.5, max_detections: int = 50
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per scene ``(boxes (k, 4), scores (k,), labels (k,))`` from model outputs
    ``(N, 15, G, G)`` (numpy, fp32): scores, threshold, per-class NMS (module doc)."""
    from mixprec.recipes.boxes import batched_nms

    out = out.astype(np.float64)
    n, _, g, _ = out.shape
    obj = 1.0 / (1.0 + np.exp(-out[:, 0]))  # (N, G, G)
    logits = out[:, 1:1 + NUM_CLASSES]
    cls = np.exp(logits - logits.max(axis=1, keepdims=True))
    cls /= cls.sum(axis=1, keepdims=True)
    scores = obj[:, None] * cls  # (N, C, G, G)
    grid = np.arange(g, dtype=np.float64)
    tw = np.minimum(out[:, 1 + NUM_CLASSES + 2:], 4.0)  # exp() bounded: boxes at most e^4 anchors
    cx = (grid[None, None, :] + out[:, 1 + NUM_CLASSES]) * STRIDE  # (N, G, G), columns on axis 2
    cy = (grid[None, :, None] + out[:, 1 + NUM_CLASSES + 1]) * STRIDE
    w, h = anchor * np.exp(tw[:, 0]), anchor * np.exp(tw[:, 1])
    all_boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)  # (N, G, G, 4)
    results = []
    for i in range(n):
        c, r, q = np.nonzero(scores[i] >= score_threshold)
        boxes, s = all_boxes[i, r, q], scores[i, c, r, q]
        keep = batched_nms(boxes, s, c, iou_threshold)[:max_detections]
        results.append((boxes[keep], s[keep], c[keep]))
    return results


# --------------------------------------------------------------------------- task


def detection(width: int = 32, canvas: int = 64, max_digits: int = 4, min_size: int = 16,
              max_size: int = 28, train_scenes: int = 4096, val_scenes: int = 200,
              batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.05,
              score_threshold: float = 0.01, max_detections: int = 50,
              eval_batch_size: int = 100) -> Task:
    """The ``detection`` Task: a single-shot digit detector on composed scenes (module doc)."""
    for name, value in [("width", width), ("max_digits", max_digits), ("train_scenes", train_scenes),
                        ("val_scenes", val_scenes), ("batch_size", batch_size),
                        ("max_detections", max_detections), ("eval_batch_size", eval_batch_size)]:
        _check_int(name, value)
    _check_int("canvas", canvas, minimum=2 * STRIDE)
    if canvas % STRIDE:
        raise UsageError(f"detection: canvas must be a multiple of {STRIDE} (the feature stride), "
                         f"got {canvas!r}; e.g. {canvas - canvas % STRIDE} or {canvas - canvas % STRIDE + STRIDE}")
    _check_int("min_size", min_size, minimum=2 * STRIDE)  # keeps two centres out of one cell
    _check_int("max_size", max_size, minimum=2 * STRIDE)
    if min_size > max_size:
        raise UsageError(f"detection: min_size={min_size} must be <= max_size={max_size}")
    if max_size > canvas:
        raise UsageError(f"detection: max_size={max_size} must be <= canvas={canvas}")
    _check_float("lr", lr, low=0.0, low_inclusive=False)
    _check_float("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    _check_float("score_threshold", score_threshold, low=0.0, low_inclusive=True, high=1.0)

    anchor = (min_size + max_size) / 2
    train, (obj_t, cls_t, box_t), val, val_targets = _data(
        int(canvas), int(max_digits), int(min_size), int(max_size), int(train_scenes), int(val_scenes))
    val_gt = val.ground_truth()
    val_targets = tuple(val_targets)
    val_images = val.images.split(eval_batch_size)

    def build_model() -> nn.Module:
        return Detector(width=width)

    def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [  # no weight decay on BatchNorm's gamma/beta or on biases
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr)

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:
            idx = torch.randint(0, len(train), (batch_size,), generator=gen)
            yield train.images[idx], obj_t[idx], cls_t[idx], box_t[idx]

    def loss(model: nn.Module, batch) -> torch.Tensor:
        device = next(model.parameters()).device
        x, obj, cls, box = (t.to(device, non_blocking=True) for t in batch)
        return detection_loss(model(x).float(), obj, cls, box)

    def evaluate(model: nn.Module) -> dict[str, float]:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                out = torch.cat([model(x.to(device, non_blocking=True)).float() for x in val_images])
                val_loss = detection_loss(out, *(t.to(device, non_blocking=True) for t in val_targets))
                host = torch.cat([out.reshape(-1), val_loss.reshape(1)]).cpu()  # the one host sync
        finally:
            for m, was_training in modes:
                m.training = was_training
        from mixprec.recipes.boxes import mean_average_precision

        out, val_loss = host[:-1].reshape(out.shape).numpy(), float(host[-1])
        dets = decode(out, anchor, score_threshold=score_threshold, max_detections=max_detections)
        map50, _ = mean_average_precision(dets, val_gt, NUM_CLASSES, iou_threshold=0.5)
        return {"map50": map50, "val_loss": val_loss}

    return Task(name="detection", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="detection",
    factory=detection,
    domain="object detection",
    model="single-shot YOLO-style detector: 7 conv-BN-ReLU layers to a stride-8 grid, one anchor per cell, "
          "objectness + 10 class logits + box per cell",
    data="64x64 scenes of 1-4 scikit-learn digits (16-28 px) at random places; 4096 training, 200 validation",
    metric="map50 (VOC all-point mAP at IoU 0.5 over the 10 digits), val_loss",
    description="Digit detection on composed scenes with per-class NMS and mAP@0.5; no downloads.",
    metric_key="map50",
    higher_is_better=True,
    expected_fp32=(0.95, 1.0),
    verify_steps=300,
    tiny=dict(width=8, train_scenes=64, val_scenes=16, batch_size=8, eval_batch_size=16),
    tiny_steps=10,
)
