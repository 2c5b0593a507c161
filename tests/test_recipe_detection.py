"""The ``detection`` recipe: box utilities (IoU, NMS, VOC mAP), scenes, targets, the Task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import get_recipe
from mixprec.recipes.boxes import (average_precision, batched_nms, box_iou, class_ap,
                                   mean_average_precision, nms)
from mixprec.recipes.detection import (NUM_CLASSES, STRIDE, Detector, decode, detection,
                                       detection_loss, encode_targets, make_scenes)
from mixprec.task import Task

TINY = get_recipe("detection").tiny


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return detection(**TINY)


@pytest.fixture(scope="module")
def scenes():
    from mixprec.recipes.digits import load_digits_split

    _, _, val_x, val_y = load_digits_split()
    return make_scenes(val_x, val_y, 60, seed=7, canvas=64, max_digits=4, min_size=16, max_size=28)


# --------------------------------------------------------------------------- IoU and NMS


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2], [0, 0, 4, 4]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], dtype=float)
    expected = np.array([[1 / 7, 1.0, 0.0],      # overlap 1 / union 7; identical; disjoint
                         [4 / 16, 4 / 16, 0.0]])  # contained boxes: area ratio
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=0, atol=1e-12)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    # Boxes that only touch along an edge do not overlap.
    assert box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1]])[0, 0] == 0.0
    # A degenerate (zero-area) box against itself: IoU 0, not NaN.
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(np.zeros((2, 3)), b)


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([[0, 0, 10, 10],    # 0: best of cluster A
                      [1, 0, 11, 10],    # 1: IoU 90/110 = 0.82 with box 0 -> suppressed
                      [20, 20, 30, 30],  # 2: alone -> kept
                      [0, 0, 10, 10],    # 3: exact duplicate of box 0, higher score -> wins
                      [21, 20, 31, 30]], dtype=float)  # 4: IoU 0.82 with box 2 -> suppressed
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    # A looser threshold keeps the 0.82-overlap boxes, but never the exact duplicate.
    assert nms(boxes, scores, 0.85).tolist() == [3, 1, 2, 4]
    # IoU exactly at the threshold is kept: inter 2, union 4 -> 0.5.
    assert nms([[0, 0, 3, 1], [1, 0, 4, 1]], [0.9, 0.8], 0.5).tolist() == [0, 1]
    assert nms(np.zeros((0, 4)), np.zeros(0)).tolist() == []


def test_batched_nms_is_per_class():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [100, 100, 110, 110]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([3, 5, 3, 5])
    # Box 1 sits on box 0 but is another class: kept; box 2 is suppressed by box 0.
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 1, 3]


# --------------------------------------------------------------------------- average precision


def test_average_precision_all_point_interpolation():
    # TP, FP, TP over 2 ground truths: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope: 1 on (0, 1/2], 2/3 on (1/2, 1] -> AP = 1/2 + 1/3.
    assert average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(5 / 6, abs=1e-12)
    assert average_precision([1.0], [1.0]) == 1.0
    assert average_precision([0.5], [1.0]) == 0.5  # recall never reaches 1
    assert average_precision([], []) == 0.0


def _gt(*boxes):
    return np.array(boxes, dtype=float).reshape(-1, 4)


def test_class_ap_hand_computed_cases():
    g1, g2, g3 = [0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]
    off = [40, 40, 50, 50]  # overlaps nothing
    gts = [_gt(g1, g2), _gt(g3)]
    # Perfect detections, any scores: AP 1.
    assert class_ap([(_gt(g1, g2), [0.3, 0.9]), (_gt(g3), [0.5])], gts) == 1.0
    # Ranked over both images: TP .95 (img 0), FP .9, FP .85, TP .8 (img 1), TP .6 (img 0):
    # precision 1, 1/2, 1/3, 1/2, 3/5 at recall 1/3, 1/3, 1/3, 2/3, 1;
    # envelope 1, then 3/5 for the last two thirds -> AP = 1/3 + 2/3 * 3/5 = 11/15.
    dets = [(_gt(g1, off, g2), [0.95, 0.9, 0.6]), (_gt(off, g3), [0.85, 0.8])]
    assert class_ap(dets, gts) == pytest.approx(11 / 15, abs=1e-12)
    # A duplicate of a matched object is a false positive: TP, FP (duplicate), TP -> 5/6.
    dets = [(_gt(g1, g1, g2), [0.9, 0.8, 0.7]), (_gt(), [])]
    one_image = [_gt(g1, g2), _gt()]
    assert class_ap(dets, one_image) == pytest.approx(5 / 6, abs=1e-12)
    assert class_ap([(_gt(g1, g2), [0.9, 0.7]), (_gt(), [])], one_image) == 1.0  # without it
    # IoU below 0.5 is a miss: a box shifted by 4 px has IoU 60/140 = 0.43.
    shifted = [4, 0, 14, 10]
    assert class_ap([(_gt(shifted), [0.9])], [_gt(g1)]) == 0.0
    assert class_ap([(_gt(shifted), [0.9])], [_gt(g1)], iou_threshold=0.4) == 1.0
    # A detection in an image that has no object of the class is a false positive.
    assert class_ap([(_gt(), []), (_gt(g1), [0.9])], [_gt(g1), _gt()]) == 0.0
    # No detections at all: AP 0; no ground truth at all: None (not part of the mean).
    assert class_ap([(_gt(), [])], [_gt(g1)]) == 0.0
    assert class_ap([(_gt(g1), [0.9])], [_gt()]) is None


def test_mean_average_precision_is_over_classes_with_ground_truth():
    g1, g2 = [0, 0, 10, 10], [20, 0, 30, 10]
    gts = [(_gt(g1, g2), np.array([0, 1]))]
    # Class 0 found (AP 1); class 1: the box is right but labelled 0 -> class 1 AP 0.
    # A class-7 detection where there is no class 7 is ignored (class 7 has no ground truth).
    dets = [(_gt(g1, g2, g2), np.array([0.9, 0.8, 0.5]), np.array([0, 0, 7]))]
    m, per_class = mean_average_precision(dets, gts, NUM_CLASSES)
    assert per_class == {0: 1.0, 1: 0.0} and m == 0.5
    # Perfect: 1.0.
    m, _ = mean_average_precision([(_gt(g1, g2), np.array([0.9, 0.8]), np.array([0, 1]))], gts, NUM_CLASSES)
    assert m == 1.0
    with pytest.raises(ValueError, match="no boxes"):
        mean_average_precision([(_gt(), [], [])], [(_gt(), np.array([], dtype=int))], NUM_CLASSES)


# --------------------------------------------------------------------------- scenes and targets


def test_scenes_are_deterministic_and_well_formed(scenes):
    from mixprec.recipes.digits import load_digits_split

    _, _, val_x, val_y = load_digits_split()
    again = make_scenes(val_x, val_y, 60, seed=7, canvas=64, max_digits=4, min_size=16, max_size=28)
    other = make_scenes(val_x, val_y, 60, seed=8, canvas=64, max_digits=4, min_size=16, max_size=28)
    assert torch.equal(scenes.images, again.images) and torch.equal(scenes.boxes, again.boxes)
    assert torch.equal(scenes.labels, again.labels)
    assert not torch.equal(scenes.images, other.images)

    assert scenes.images.shape == (60, 1, 64, 64) and scenes.images.dtype == torch.float32
    assert 0.0 <= float(scenes.images.min()) and float(scenes.images.max()) <= 1.0
    counts = (scenes.labels >= 0).sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 4 and len(set(counts.tolist())) > 1
    for img, boxes, labels in zip(scenes.images[:, 0], scenes.boxes, scenes.labels):
        assert (labels[labels >= 0] < NUM_CLASSES).all()
        assert (labels[(labels < 0).cumsum(0) > 0] == -1).all()  # padding only at the end
        covered = torch.zeros_like(img, dtype=torch.bool)
        for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
            if label < 0:
                continue
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            patch = img[y1:y2, x1:x2]
            # A tight ink box: ink on each of its four edges.
            assert all(bool((edge > 0.2).any()) for edge in (patch[0], patch[-1], patch[:, 0], patch[:, -1]))
            covered[y1:y2, x1:x2] = True
        assert not bool((img[~covered] > 0.2).any())  # no ink outside the boxes


def test_encode_targets_marks_the_centre_cell(scenes):
    anchor = 22.0
    obj, cls, box = encode_targets(scenes, 64, anchor)
    g = 64 // STRIDE
    assert obj.shape == cls.shape == (60, g, g) and box.shape == (60, 4, g, g)
    assert int(obj.sum()) == int((scenes.labels >= 0).sum())  # one cell per object
    assert torch.equal(obj > 0, cls >= 0)
    i, k = 0, 0
    x1, y1, x2, y2 = scenes.boxes[i, k].tolist()
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    row, col = int(cy // STRIDE), int(cx // STRIDE)
    assert obj[i, row, col] == 1 and cls[i, row, col] == scenes.labels[i, k]
    expected = [cx / STRIDE - col, cy / STRIDE - row, math.log((x2 - x1) / anchor), math.log((y2 - y1) / anchor)]
    torch.testing.assert_close(box[i, :, row, col], torch.tensor(expected), rtol=0, atol=1e-6)
    assert 0 <= float(box[:, :2].min()) and float(box[:, :2].max()) < 1


def _perfect_output(obj, cls, box, wrong_class: bool = False) -> np.ndarray:
    """Model outputs that say exactly what the targets say."""
    n, g, _ = obj.shape
    out = torch.zeros(n, 1 + NUM_CLASSES + 4, g, g)
    out[:, 0] = torch.where(obj > 0, 12.0, -12.0)
    target = (cls.clamp(min=0) + (1 if wrong_class else 0)) % NUM_CLASSES
    out[:, 1:1 + NUM_CLASSES] = 10.0 * torch.nn.functional.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2)
    out[:, 1 + NUM_CLASSES:] = box
    return out.numpy()


def test_decode_of_perfect_outputs_recovers_the_boxes_and_scores_map_one(scenes):
    anchor = 22.0
    obj, cls, box = encode_targets(scenes, 64, anchor)
    dets = decode(_perfect_output(obj, cls, box), anchor)
    gts = scenes.ground_truth()
    for (b, s, l), (gb, gl) in zip(dets, gts):
        assert len(b) == len(gb)
        order = np.lexsort(np.round(gb[:, :2], 3).T)
        mine = np.lexsort(np.round(b[:, :2], 3).T)
        np.testing.assert_allclose(b[mine], gb[order], atol=1e-4)
        assert (l[mine] == gl[order]).all() and (s > 0.99).all()
    m, per_class = mean_average_precision(dets, gts, NUM_CLASSES)
    assert m == pytest.approx(1.0) and len(per_class) == NUM_CLASSES
    # The same boxes with every class wrong: mAP 0.
    wrong = decode(_perfect_output(obj, cls, box, wrong_class=True), anchor)
    assert mean_average_precision(wrong, gts, NUM_CLASSES)[0] == 0.0


def test_loss_prefers_the_perfect_output(scenes):
    anchor = 22.0
    obj, cls, box = encode_targets(scenes, 64, anchor)
    perfect = torch.from_numpy(_perfect_output(obj, cls, box))
    wrong = torch.from_numpy(_perfect_output(obj, cls, box, wrong_class=True))
    zero = torch.zeros_like(perfect)
    lp, lw, lz = (float(detection_loss(o, obj, cls, box)) for o in (perfect, wrong, zero))
    assert lp < 1e-3 and lw > 5.0 and lz > 1.0


# --------------------------------------------------------------------------- the Task


def test_tiny_task_builds_and_batches_are_deterministic(tiny_task):
    torch.manual_seed(0)
    state = torch.get_rng_state()

    def take(seed, n=3):
        it = tiny_task.train_batches(seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for xa, xb in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(xa, xb))
    assert not all(torch.equal(xa[0], xc[0]) for xa, xc in zip(a, c))
    x, obj, cls, box = a[0]
    bs = TINY["batch_size"]
    assert x.shape == (bs, 1, 64, 64) and obj.shape == (bs, 8, 8) and box.shape == (bs, 4, 8, 8)
    model = tiny_task.build_model()
    assert isinstance(model, Detector)
    assert model(x).shape == (bs, 1 + NUM_CLASSES + 4, 8, 8)


def test_data_is_independent_of_the_training_seed_and_cached():
    from mixprec.recipes import detection as det

    t1, t2 = detection(**TINY), detection(**TINY)
    assert det._data.cache_info().hits >= 1
    det._data.cache_clear()
    t3 = detection(**TINY)
    # Fresh generation gives the same validation result on the same model.
    torch.manual_seed(0)
    model = t1.build_model()
    assert t1.evaluate(model) == t3.evaluate(model)


def test_loss_is_fp32_under_bf16_autocast(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    batch = next(tiny_task.train_batches(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_training_lowers_the_loss(tiny_task, precision):
    result = mixprec.train(tiny_task, precision, steps=16, seed=0, monitor_every=0)
    losses = result["losses"]
    assert result["status"] == "completed" and all(math.isfinite(l) for l in losses)
    # Measured (fp32 and bf16, seeds 0-2): last-4 mean / first-4 mean about 0.3-0.5.
    assert _mean(losses[-4:]) < 0.75 * _mean(losses[:4]), losses
    assert set(result["eval"]) == {"map50", "val_loss"}


def test_evaluate_keys_finite_and_restores_mode(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    model.train()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"map50", "val_loss"}
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["map50"] <= 1.0
    assert all(m.training for m in model.modules())
    assert tiny_task.evaluate(model) == metrics  # BatchNorm statistics untouched by evaluation
    model.eval()
    tiny_task.evaluate(model)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(width=0), "0"),
        (dict(canvas=60), "60"),
        (dict(canvas=8), "8"),
        (dict(max_digits=0), "0"),
        (dict(min_size=12), "12"),
        (dict(min_size=30, max_size=20), "30"),
        (dict(max_size=72), "72"),
        (dict(train_scenes=2.5), "2.5"),
        (dict(batch_size=True), "True"),
        (dict(lr=0.0), "0.0"),
        (dict(lr=float("nan")), "nan"),
        (dict(weight_decay=-1.0), "-1.0"),
        (dict(score_threshold=1.0), "1.0"),
        (dict(eval_batch_size="8"), "'8'"),
    ],
)
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        detection(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert next(iter(kwargs)) in message


def test_recipe_info():
    info = get_recipe("detection")
    assert info.factory is detection and info.metric_key == "map50" and info.higher_is_better
    assert info.expected_fp32 is not None and 0.0 < info.expected_fp32[0] < info.expected_fp32[1] <= 1.0
