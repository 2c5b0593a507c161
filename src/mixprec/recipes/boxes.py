"""Box utilities for the ``detection`` recipe: IoU, greedy NMS and VOC-style mAP, in numpy.

torchvision is not a dependency, so these are written out here. Boxes are ``(x1, y1, x2, y2)``
in pixels with ``x2 > x1`` and ``y2 > y1`` (continuous coordinates: the pixel in column ``i``
covers ``[i, i + 1)``, so a box of whole pixels ``i..j`` is ``(i, ., j + 1, .)``). Arrays are
``float`` ``(N, 4)``; scores ``(N,)``; class labels ``int`` ``(N,)``.

Average precision (:func:`average_precision`, :func:`mean_average_precision`) follows the
PASCAL VOC 2010+ devkit: all-point interpolation (the area under the precision envelope of
the precision-recall curve). Detections of one class are ranked by score over all images
(ties keep their input order); each is a true positive when its best-overlapping ground
truth of that class in its image has IoU >= the threshold and was not matched by a
higher-ranked detection, and a false positive otherwise (a duplicate of a matched object
is a false positive, as is a detection in an image without that class). mAP is the mean of
the per-class APs over the classes that have at least one ground-truth box; a class with
ground truth but no detections has AP 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["box_area", "box_iou", "nms", "batched_nms", "average_precision", "class_ap",
           "mean_average_precision"]


def _as_boxes(boxes) -> np.ndarray:
    a = np.asarray(boxes, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {a.shape}")
    return a


def box_area(boxes) -> np.ndarray:
    """Areas of ``(N, 4)`` boxes; a degenerate box (x2 <= x1 or y2 <= y1) has area 0."""
    b = _as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a, b) -> np.ndarray:
    """Pairwise intersection over union, ``(N, 4) x (M, 4) -> (N, M)``; 0 where the union is 0."""
    a, b = _as_boxes(a), _as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes, scores, iou_threshold: float = 0.5) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box is strictly
    greater than ``iou_threshold`` (ties in score keep the input order)."""
    b = _as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(b):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")
    iou = box_iou(b[order], b[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes, scores, labels, iou_threshold: float = 0.5) -> np.ndarray:
    """NMS within each label separately (boxes of different labels never suppress each
    other); indices of the kept boxes, highest score first."""
    b = _as_boxes(boxes)
    labels = np.asarray(labels).reshape(-1)
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    # Shift each label's boxes to their own region so that they cannot overlap another's.
    span = float(b.max() - b.min()) + 1.0
    shifted = b + ((labels.astype(np.float64) - labels.min()) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def average_precision(recall, precision) -> float:
    """All-point interpolated AP (VOC 2010+): the area under the precision envelope.

    ``recall`` (non-decreasing) and ``precision`` are the values after each ranked detection.
    """
    rec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    pre = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    pre = np.maximum.accumulate(pre[::-1])[::-1]  # precision envelope: max to the right
    steps = np.nonzero(rec[1:] != rec[:-1])[0]
    return float(np.sum((rec[steps + 1] - rec[steps]) * pre[steps + 1]))


def class_ap(detections: Sequence[tuple[np.ndarray, np.ndarray]],
             ground_truths: Sequence[np.ndarray], iou_threshold: float = 0.5) -> float | None:
    """AP of one class. ``detections[i] = (boxes, scores)`` and ``ground_truths[i] = boxes``
    for image ``i``. ``None`` when there is no ground truth of the class at all."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truths)} of ground truth")
    gts = [_as_boxes(g) for g in ground_truths]
    n_pos = sum(len(g) for g in gts)
    if n_pos == 0:
        return None
    image, boxes, scores = [], [], []
    for i, (b, s) in enumerate(detections):
        b = _as_boxes(b)
        image.append(np.full(len(b), i))
        boxes.append(b)
        scores.append(np.asarray(s, dtype=np.float64).reshape(-1))
    image, boxes, scores = np.concatenate(image), np.concatenate(boxes), np.concatenate(scores)
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    matched = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = np.zeros(len(order))
    for rank, d in enumerate(order):
        g = gts[image[d]]
        if len(g) == 0:
            continue
        iou = box_iou(boxes[d:d + 1], g)[0]
        best = int(np.argmax(iou))
        if iou[best] >= iou_threshold and not matched[image[d]][best]:
            matched[image[d]][best] = True
            tp[rank] = 1.0
    ctp = np.cumsum(tp)
    recall = ctp / n_pos
    precision = ctp / np.arange(1, len(tp) + 1)
    return average_precision(recall, precision)


def mean_average_precision(detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                           ground_truths: Sequence[tuple[np.ndarray, np.ndarray]],
                           num_classes: int, iou_threshold: float = 0.5
                           ) -> tuple[float, dict[int, float]]:
    """``(mAP, {class: AP})`` over the classes with ground truth.

    ``detections[i] = (boxes, scores, labels)`` and ``ground_truths[i] = (boxes, labels)``
    for image ``i``; labels are integers in ``[0, num_classes)``."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truths)} of ground truth")
    dets = [(_as_boxes(b), np.asarray(s, dtype=np.float64).reshape(-1), np.asarray(l).reshape(-1))
            for b, s, l in detections]
    gts = [(_as_boxes(b), np.asarray(l).reshape(-1)) for b, l in ground_truths]
    per_class = {}
    for c in range(num_classes):
        ap = class_ap([(b[l == c], s[l == c]) for b, s, l in dets], [b[l == c] for b, l in gts],
                      iou_threshold)
        if ap is not None:
            per_class[c] = ap
    if not per_class:
        raise ValueError("mean_average_precision: the ground truth holds no boxes")
    return float(np.mean(list(per_class.values()))), per_class
