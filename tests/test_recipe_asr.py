"""The ``asr`` recipe: synthetic spoken-symbol audio, log-mel features, the CTC model and its Task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import RECIPES, audio, get_recipe
from mixprec.recipes.asr import (BLANK, CTCModel, asr, cer, edit_distance, greedy_decode,
                                 load_asr_data, subsampled_lengths)
from mixprec.task import Task

TINY = dict(d_model=32, n_layer=1, n_head=2, batch_size=8, n_train=64, n_val=32)


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return asr(**TINY)


# --------------------------------------------------------------------------- metric


@pytest.mark.parametrize("ref, hyp, expected", [
    ([], [], 0),
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [], 3),           # three deletions
    ([], [4, 5], 2),              # two insertions
    ([1, 2, 3], [1, 3], 1),       # one deletion
    ([1, 2, 3], [1, 4, 3], 1),    # one substitution
    ([1, 2, 3], [3, 2, 1], 2),    # two substitutions
    ([1, 2], [2, 1, 2], 1),       # one insertion at the front
    # "kitten" -> "sitting": the textbook 3 (2 substitutions, 1 insertion)
    ([11, 9, 20, 20, 5, 14], [19, 9, 20, 20, 9, 14, 7], 3),
])
def test_edit_distance_hand_cases(ref, hyp, expected):
    assert edit_distance(ref, hyp) == expected
    assert edit_distance(hyp, ref) == expected  # symmetric


@pytest.mark.parametrize("frames, expected", [
    ([], []),
    ([0, 0, 0], []),                       # all blank: empty output
    ([3, 3, 3], [3]),                      # repeats collapse
    ([0, 1, 1, 0, 1, 2, 2, 0], [1, 1, 2]),  # a blank separates a real repeat
    ([1, 1, 2, 2, 1], [1, 2, 1]),
    ([0, 5, 0, 0, 6, 6, 6, 0, 0], [5, 6]),
])
def test_greedy_decode_collapses_repeats_then_drops_blanks(frames, expected):
    assert BLANK == 0
    assert greedy_decode(frames) == expected
    assert greedy_decode(torch.tensor(frames, dtype=torch.long)) == expected


def test_cer_hand_cases():
    refs = [[1, 2, 3], [4, 5]]
    assert cer(refs, refs) == 0.0
    assert cer(refs, [[], []]) == 1.0  # empty output: every symbol deleted
    assert cer(refs, [[1, 3], [4, 5, 6]]) == pytest.approx(2 / 5)  # corpus-level, not a mean
    assert cer(refs, [[7, 7, 7, 7], [7, 7, 7]]) == pytest.approx(7 / 5)  # insertions: CER can exceed 1
    with pytest.raises(ValueError):
        cer(refs, [[1]])


# --------------------------------------------------------------------------- audio and features


def test_utterances_are_deterministic_prefix_stable_and_split():
    waves, labels = audio.utterance_set(audio.STREAM_TRAIN, 6)
    audio.utterance_set.cache_clear()
    waves2, labels2 = audio.utterance_set(audio.STREAM_TRAIN, 6)
    assert labels == labels2 and all(np.array_equal(a, b) for a, b in zip(waves, waves2))
    more, more_labels = audio.utterance_set(audio.STREAM_TRAIN, 9)
    assert more_labels[:6] == labels and np.array_equal(more[5], waves[5])  # a prefix
    val, _ = audio.utterance_set(audio.STREAM_VAL, 6)
    assert not any(np.array_equal(a, b) for a, b in zip(waves, val))
    for w, lab in zip(waves, labels):
        assert w.dtype == np.float32 and w.ndim == 1 and np.abs(w).max() <= 1.0
        assert 3 <= len(lab) <= 6 and all(1 <= c <= audio.N_SYMBOLS for c in lab)
        # 80-160 ms per symbol plus silences: the duration follows the symbol count
        assert 0.08 * len(lab) < len(w) / audio.SAMPLE_RATE < 0.16 * len(lab) + 0.06 * len(lab) + 0.2


def test_symbols_have_distinct_spectra():
    """Each symbol's steady part has its own log-mel pattern (no two symbols alike)."""
    rng = np.random.default_rng(0)
    patterns = []
    for label in range(1, audio.N_SYMBOLS + 1):
        w = audio.synthesize(rng, [label], dur_ms=(300, 300), snr_db=(60, 60))
        feats = audio.log_mel(torch.from_numpy(w))
        patterns.append(feats[len(feats) // 2 - 2: len(feats) // 2 + 3].mean(0))  # the middle frames
    p = torch.stack(patterns)
    d = torch.cdist(p, p) + torch.eye(len(p)) * 1e9
    assert float(d.min()) > 1.0


def test_mel_filterbank_and_log_mel():
    fb = audio.mel_filterbank(256, 40)
    assert fb.shape == (40, 129) and float(fb.min()) >= 0
    peaks = fb.max(dim=1).values  # no empty band: every triangle catches at least one FFT bin
    assert float(peaks.min()) > 0.5 and float(peaks.max()) <= 1.0
    centres = fb.argmax(dim=1)
    assert torch.all(centres[1:] >= centres[:-1])  # ascending in frequency
    # A pure 1 kHz tone lights up the band whose centre is nearest 1 kHz.
    t = torch.arange(8000) / 8000
    feats = audio.log_mel(torch.sin(2 * math.pi * 1000 * t))
    assert feats.shape == (1 + 8000 // 80, 40)
    band = int(feats[10:-10].mean(0).argmax())
    assert abs(float(centres[band]) * 8000 / 256 - 1000) < 100
    # Silence hits the log floor exactly.
    assert torch.all(audio.log_mel(torch.zeros(800)) == math.log(audio.LOG_FLOOR))


def test_log_mel_batched_equals_one_by_one():
    waves, _ = audio.utterance_set(audio.STREAM_TRAIN, 4)
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    together = audio.log_mel(batch)
    for i, w in enumerate(waves):
        alone = audio.log_mel(torch.from_numpy(w))
        torch.testing.assert_close(together[i, : len(alone)], alone, rtol=1e-5, atol=1e-5)


def test_loaded_features_are_normalized_and_padded_with_zeros():
    (x, lengths, y, ylen), (vx, vlen, vy, vylen) = load_asr_data(TINY["n_train"], TINY["n_val"])
    assert x.shape[0] == TINY["n_train"] and vx.shape[0] == TINY["n_val"] and x.shape[2] == 40
    real = torch.cat([x[i, : int(n)] for i, n in enumerate(lengths)])
    assert real.mean(0).abs().max() < 1e-3 and (real.std(0) - 1).abs().max() < 1e-2
    i = int(lengths.argmin())
    assert torch.all(x[i, int(lengths[i]):] == 0)
    assert torch.all(y[:, :].max(1).values >= 1) and int(y.max()) <= audio.N_SYMBOLS
    assert torch.all((y > 0).sum(1) == ylen)


# --------------------------------------------------------------------------- batches


def test_train_batches_shapes_and_lengths(tiny_task):
    x, lengths, y, ylen = next(tiny_task.train_batches(0))
    B = TINY["batch_size"]
    assert x.shape == (B, int(lengths.max()), 40) and x.dtype == torch.float32
    assert lengths.shape == ylen.shape == (B,) and y.shape == (B, int(ylen.max()))
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) <= audio.N_SYMBOLS
    # CTC is feasible: enough frames after subsampling for every label sequence and its repeats
    repeats = torch.tensor([int((r[1:n] == r[: n - 1]).sum()) for r, n in zip(y, ylen)])
    assert torch.all(subsampled_lengths(lengths) >= ylen + repeats)


def test_train_batches_deterministic_per_seed_and_leave_global_rng_alone(tiny_task):
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def take(seed, n=4):
        it = tiny_task.train_batches(seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert torch.equal(torch.get_rng_state(), state)
    for ba, bb in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(ba, bb))
    assert not all(torch.equal(ba[2], bc[2]) and torch.equal(ba[1], bc[1]) for ba, bc in zip(a, c))


# --------------------------------------------------------------------------- model


def test_subsampled_lengths_match_the_front_end():
    torch.manual_seed(0)
    model = CTCModel(d_model=16, n_layer=1, n_head=2).eval()
    for T in (1, 2, 3, 4, 5, 8, 9, 37, 100):
        logits, out_len = model(torch.randn(1, T, 40), torch.tensor([T]))
        assert logits.shape[1] == int(out_len) == int(subsampled_lengths(torch.tensor([T])))


def test_zero_padding_does_not_change_the_output():
    """An utterance gives the same logits alone and zero-padded inside a longer batch."""
    torch.manual_seed(0)
    model = CTCModel(d_model=32, n_layer=2, n_head=2).eval()
    x = torch.randn(1, 41, 40)
    with torch.no_grad():
        alone, n = model(x, torch.tensor([41]))
        other = torch.randn(1, 67, 40)
        batch = torch.cat([torch.cat([x, torch.zeros(1, 26, 40)], dim=1), other])
        together, m = model(batch, torch.tensor([41, 67]))
    assert int(n) == int(m[0]) == 11 and together.shape[1] == int(m[1]) == 17
    torch.testing.assert_close(together[:1, : int(n)], alone, rtol=1e-4, atol=1e-5)


def test_loss_is_fp32_under_bf16_autocast_and_near_its_initial_value(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    batch = next(tiny_task.train_batches(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and math.isfinite(loss.item())
    assert loss.item() > 1.0  # an untrained model is far from the labels


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, shown", [
    (dict(d_model=0), "0"),
    (dict(d_model=30, n_head=4), "30"),
    (dict(d_model=33, n_head=3), "33"),  # odd: no sinusoidal positions
    (dict(n_layer=-1), "-1"),
    (dict(batch_size=2.5), "2.5"),
    (dict(n_train=True), "True"),
    (dict(eval_batch_size="8"), "'8'"),
    (dict(lr=0.0), "0.0"),
    (dict(lr=float("inf")), "inf"),
    (dict(weight_decay=-0.5), "-0.5"),
    (dict(dropout=1.5), "1.5"),
    (dict(min_symbols=5, max_symbols=3), "3"),
    (dict(max_symbols=50), "50"),
])
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        asr(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert list(kwargs)[-1] in message or list(kwargs)[0] in message


# --------------------------------------------------------------------------- training and evaluation


def _head_means(losses, k=4):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_short_training_lowers_the_ctc_loss(tiny_task, precision):
    result = mixprec.train(tiny_task, precision, steps=24, seed=0, monitor_every=0)
    assert result["status"] == "completed"
    first, last = _head_means(result["losses"])
    # Measured (tiny, seeds 0-2, fp32 and bf16-mixed): the last-4 mean is 0.37-0.46x the first-4 mean.
    assert last < 0.75 * first, result["losses"]
    assert set(result["eval"]) == {"cer", "val_loss"}


def test_evaluate_keys_modes_and_a_blank_only_model(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"cer", "val_loss"}
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())
    assert model.training  # the mode it found is restored
    assert tiny_task.evaluate(model) == metrics  # fixed validation set
    model.eval()
    tiny_task.evaluate(model)
    assert not model.training
    model.blocks[0].train()  # a mixed state is restored module by module
    tiny_task.evaluate(model)
    assert model.blocks[0].training and not model.training and not model.head.training

    # A model that predicts only blanks outputs nothing: CER exactly 1.0.
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[BLANK] = 10.0
    blank = tiny_task.evaluate(model)
    assert blank["cer"] == 1.0 and blank["val_loss"] > 10


def test_evaluate_after_training_beats_the_blank_output():
    """A few dozen steps at a small size already emit symbols, and mostly the right ones."""
    task = asr(d_model=64, n_layer=1, n_head=2, batch_size=16, n_train=256, n_val=32, lr=3e-3)
    result = mixprec.train(task, "fp32", steps=60, seed=0, monitor_every=0)
    # Measured: cer 0.04-0.09 after 60 steps at this size (seeds 0-2); blank output is 1.0.
    assert result["eval"]["cer"] < 0.5, result["eval"]


# --------------------------------------------------------------------------- registry


def test_registry_entry():
    info = get_recipe("asr")
    assert "asr" in RECIPES and info.factory is asr
    assert info.metric_key == "cer" and info.higher_is_better is False
    assert info.tiny == TINY
    lo, hi = info.expected_fp32
    assert 0.0 <= lo < hi < 1.0  # documented range: far below the blank output's 1.0
