"""The ``recsys`` recipe: synthetic click logs, the DLRM model, its metrics and its Task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import RecipeInfo, get_recipe
from mixprec.recipes import recsys as recsys_module
from mixprec.recipes.recsys import DLRM, bayes_auc, click_metrics, generate_click_logs, recsys
from mixprec.task import Task

TINY = get_recipe("recsys").tiny
DATA = dict(table_sizes=(1000, 50, 10), hotness=(1, 2, 1), n_train=8192, n_val=2048)


@pytest.fixture(scope="module")
def tiny_task() -> Task:
    return recsys(**TINY)


# --------------------------------------------------------------------------- data


def test_click_logs_deterministic_shapes_and_ranges():
    train, val = generate_click_logs(**DATA)
    recsys_module._generate.cache_clear()
    train2, val2 = generate_click_logs(**DATA)
    assert train2 is not train  # really generated again, not the cached object
    for a, b in ((train, train2), (val, val2)):
        assert torch.equal(a.dense, b.dense) and torch.equal(a.clicks, b.clicks) and torch.equal(a.prob, b.prob)
        assert all(torch.equal(x, y) for x, y in zip(a.ids, b.ids))
    assert len(train) == 8192 and len(val) == 2048
    assert train.dense.shape == (8192, 13) and train.dense.dtype == torch.float32
    for ids, vocab, hot in zip(train.ids, DATA["table_sizes"], DATA["hotness"]):
        assert ids.shape == (8192, hot) and ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < vocab
    assert set(train.clicks.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < float(train.clicks.mean()) < 0.6
    assert train.prob.dtype == torch.float64 and bool(((train.prob > 0) & (train.prob < 1)).all())


def test_train_and_val_are_different_rows():
    train, val = generate_click_logs(**DATA)
    assert not torch.equal(train.dense[:len(val)], val.dense)
    rows = {tuple(r) for r in train.dense[:, :3].tolist()}
    assert not any(tuple(r) in rows for r in val.dense[:, :3].tolist())


def test_ids_follow_a_zipf_law():
    # One big one-hot table: the most frequent id's share matches 1 / H(V, s), and the
    # top 10% of ids carry most of the mass (a uniform draw would give 10%).
    vocab, s, n = 5000, 1.1, 200_000
    train, _ = generate_click_logs(table_sizes=(vocab, 10), hotness=(1, 1), n_train=n, n_val=10)
    counts = np.sort(np.bincount(train.ids[0][:, 0].numpy(), minlength=vocab))[::-1]
    harmonic = (np.arange(1, vocab + 1, dtype=np.float64) ** -s).sum()
    top_share = counts[0] / n
    assert top_share == pytest.approx(1.0 / harmonic, rel=0.05)
    assert counts[1] / n == pytest.approx(2.0 ** -s / harmonic, rel=0.08)
    assert counts[: vocab // 10].sum() / n > 0.7


def test_clicks_are_bernoulli_of_the_true_probability():
    train, _ = generate_click_logs(**DATA)
    prob, clicks = train.prob.numpy(), train.clicks.numpy()
    assert prob.std() > 0.15  # the hidden model carries real signal
    for lo, hi in ((0.0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.0)):
        sel = (prob >= lo) & (prob < hi)
        assert sel.sum() > 200
        expected = prob[sel].mean()
        sd = math.sqrt(expected * (1 - expected) / sel.sum())
        assert abs(clicks[sel].mean() - expected) < 4 * sd + 1e-3, (lo, hi)


def test_bayes_auc_is_the_ceiling_of_the_true_model():
    ceiling = bayes_auc(**DATA)
    assert 0.75 < ceiling < 0.98
    _, val = generate_click_logs(**DATA)
    noisy = val.prob.numpy() + np.random.default_rng(0).normal(0, 0.3, len(val))
    assert click_metrics(np.log(np.clip(noisy, 1e-3, None)), val.clicks.numpy())["auc"] < ceiling


# --------------------------------------------------------------------------- metrics


def test_click_metrics_hand_computed_cases():
    y = np.array([0.0, 0.0, 1.0, 1.0])
    perfect = click_metrics(np.array([-3.0, -1.0, 1.0, 3.0]), y)
    assert perfect["auc"] == 1.0
    assert click_metrics(np.array([3.0, 1.0, -1.0, -3.0]), y)["auc"] == 0.0
    constant = click_metrics(np.zeros(4), y)
    assert constant["auc"] == 0.5 and constant["logloss"] == pytest.approx(math.log(2), abs=1e-12)
    # One inversion out of four (pos, neg) pairs: AUC 3/4.
    assert click_metrics(np.array([-2.0, 0.5, 0.0, 2.0]), y)["auc"] == 0.75
    # logloss of single rows: log(1 + e^-z) for a click, log(1 + e^z) for a non-click.
    two = click_metrics(np.array([2.0, 1.0]), np.array([1.0, 0.0]))
    assert two["logloss"] == pytest.approx((math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2, rel=1e-12)
    # Large logits do not overflow (float64, logaddexp).
    huge = click_metrics(np.array([-800.0, 800.0]), np.array([0.0, 1.0]))
    assert huge["logloss"] == 0.0 and huge["auc"] == 1.0


# --------------------------------------------------------------------------- model


def test_dlrm_forward_interactions_and_bag_sum():
    torch.manual_seed(0)
    model = DLRM(n_dense=5, table_sizes=(30, 20), embedding_dim=4, bottom_mlp=(8,), top_mlp=(8,)).eval()
    assert model.top[0].in_features == 4 + 3  # dense vector + 3 pairs of 3 vectors
    assert all(e.mode == "sum" for e in model.embeddings)
    dense = torch.randn(6, 5)
    ids = [torch.randint(0, 30, (6, 3)), torch.randint(0, 20, (6, 1))]
    with torch.no_grad():
        out = model(dense, ids)
        assert out.shape == (6,) and out.dtype == torch.float32
        # A bag is a sum: the order of the ids in it does not matter...
        torch.testing.assert_close(model(dense, [ids[0].flip(1), ids[1]]), out, rtol=0, atol=1e-6)
        # ... and the bag's embedding is the sum of the rows.
        bag = model.embeddings[0](ids[0])
        torch.testing.assert_close(bag, model.embeddings[0].weight[ids[0]].sum(1), rtol=1e-6, atol=1e-6)
        changed = ids[1].clone()
        changed[0] = (changed[0] + 1) % 20
        out2 = model(dense, [ids[0], changed])
    assert out2[0] != out[0] and torch.equal(out2[1:], out[1:])
    with pytest.raises(ValueError, match="2 id tensors"):
        model(dense, ids[:1])


def test_largest_table_dominates_the_parameters():
    model = DLRM()  # defaults: the 200k-row table is most of the model
    table = model.embeddings[0].weight.numel()
    assert table == 200_000 * 16
    assert table > 0.8 * sum(p.numel() for p in model.parameters())


def test_loss_is_fp32_under_bf16_autocast(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    batch = next(tiny_task.train_batches(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert 0.3 < loss.item() < 1.5


def test_optimizer_gives_tables_their_own_learning_rate(tiny_task):
    model = tiny_task.build_model()
    opt = tiny_task.build_optimizer(model)
    assert isinstance(opt, torch.optim.Adam)
    dense, tables = opt.param_groups
    assert dense["lr"] == TINY["lr"] and tables["lr"] == TINY["embedding_lr"] != TINY["lr"]
    assert opt.defaults["fused"] is True
    assert {id(p) for p in tables["params"]} == {id(e.weight) for e in model.embeddings}
    assert len(dense["params"]) + len(tables["params"]) == len(list(model.parameters()))


# --------------------------------------------------------------------------- batches


def test_train_batches_deterministic_per_seed_and_leave_global_rng_alone(tiny_task):
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def take(seed, n=4):
        it = tiny_task.train_batches(seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert torch.equal(torch.get_rng_state(), state)
    dense, ids, clicks = a[0]
    assert dense.shape == (TINY["batch_size"], 13) and clicks.shape == (TINY["batch_size"],)
    assert [i.shape[1] for i in ids] == list(TINY["hotness"])
    for (da, ia, ca), (db, ib, cb) in zip(a, b):
        assert torch.equal(da, db) and torch.equal(ca, cb) and all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])


def test_train_batches_cover_an_epoch_without_repeats(tiny_task):
    it = tiny_task.train_batches(0)
    per_epoch = TINY["n_train"] // TINY["batch_size"]
    rows = torch.cat([next(it)[0] for _ in range(per_epoch)])
    assert torch.unique(rows, dim=0).shape[0] == TINY["n_train"]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(table_sizes=()), "()"),
        (dict(table_sizes=(100, 1)), "(100, 1)"),
        (dict(table_sizes=(100, 2.5)), "2.5"),
        (dict(table_sizes=100), "100"),
        (dict(hotness=(1, 0, 1, 1, 1, 1, 1, 1)), "0"),
        (dict(hotness=(1, 1)), "(1, 1)"),
        (dict(embedding_dim=0), "0"),
        (dict(bottom_mlp=(64, -1)), "-1"),
        (dict(top_mlp="big"), "'big'"),
        (dict(batch_size=True), "True"),
        (dict(lr=0.0), "0.0"),
        (dict(embedding_lr=float("inf")), "inf"),
        (dict(zipf_exponent=-1.0), "-1.0"),
        (dict(n_train=0), "0"),
        (dict(n_val=1), "1"),
        (dict(fused="yes"), "'yes'"),
    ],
)
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        recsys(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert next(iter(kwargs)) in message


# --------------------------------------------------------------------------- training


def _halves(losses, k=5):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize("policy", ["fp32", "bf16-mixed"])
def test_train_lowers_the_loss_and_evaluate_is_sane(tiny_task, policy):
    steps = get_recipe("recsys").tiny_steps
    result = mixprec.train(tiny_task, policy, steps=steps, monitor_every=0)
    assert result["status"] == "completed" and not result["skipped_steps"]
    first, last = _halves(result["losses"])
    # Measured (fp32 and bf16, seeds 0-4): last-5 / first-5 mean 0.76-0.89, auc 0.74-0.79.
    assert last < 0.93 * first, result["losses"]
    metrics = result["eval"]
    assert set(metrics) == {"auc", "logloss"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["auc"] > 0.6  # chance is 0.5


def test_evaluate_restores_modes_and_is_deterministic(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    model.train()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"auc", "logloss"} and all(type(v) is float for v in metrics.values())
    assert 0.3 < metrics["auc"] < 0.7  # untrained: near chance
    assert math.isfinite(metrics["logloss"])
    assert model.training and all(m.training for m in model.modules())
    assert tiny_task.evaluate(model) == metrics
    model.eval()
    tiny_task.evaluate(model)
    assert not any(m.training for m in model.modules())


def test_registry_entry():
    info = get_recipe("recsys")
    assert isinstance(info, RecipeInfo) and info.factory is recsys
    assert info.metric_key == "auc" and info.higher_is_better
    lo, hi = info.expected_fp32
    assert 0.5 < lo < hi < 1.0
