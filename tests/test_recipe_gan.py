"""The ``gan`` recipe: DCGAN on the digits, the simultaneous-update loss, FID and its Task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mixprec
from mixprec.errors import UsageError
from mixprec.recipes import RecipeInfo, get_recipe
from mixprec.recipes import gan as gan_module
from mixprec.recipes.gan import (
    DCGAN, classifier_path, fid_classifier, frechet_distance, gan, gan_losses, gaussian_stats,
    load_digit_images, save_sample_grid,
)
from mixprec.task import Task

TINY = get_recipe("gan").tiny


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory):
    """Every test here caches the FID classifier under a temporary XDG_CACHE_HOME."""
    home = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def tiny_task(cache_home) -> Task:
    return gan(**TINY)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    mu, sigma = gaussian_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(8, 8))
    sigma = m @ m.T + np.eye(8)  # a full (non-diagonal) covariance
    mu = rng.normal(size=8)
    shift = np.arange(8, dtype=np.float64)
    # Same covariance, shifted mean: the squared distance of the means.
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Isotropic covariances a^2 I and b^2 I in d dims: d (a - b)^2.
    d, a, b = 5, 2.0, 0.5
    assert frechet_distance(np.zeros(d), a * a * np.eye(d), np.zeros(d), b * b * np.eye(d)) == pytest.approx(
        d * (a - b) ** 2, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[9.0]], [-1.0], [[4.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # Symmetric.
    s2 = np.diag(np.linspace(0.5, 3.0, 8))
    assert frechet_distance(mu, sigma, shift, s2) == pytest.approx(frechet_distance(shift, s2, mu, sigma), rel=1e-9)


def test_frechet_distance_of_singular_covariances_is_finite():
    rank_one = np.outer(np.ones(4), np.ones(4))
    value = frechet_distance(np.zeros(4), rank_one, np.ones(4), np.zeros((4, 4)))
    assert math.isfinite(value) and value == pytest.approx(4.0 + 4.0, rel=1e-3)
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_gaussian_stats_match_numpy():
    x = np.random.default_rng(2).normal(size=(50, 3))
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.T))
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 3)))


# --------------------------------------------------------------------------- the FID classifier


def test_classifier_is_accurate_cached_to_xdg_and_reloaded(cache_home, monkeypatch):
    clf = fid_classifier(16)
    assert clf.val_accuracy > 0.95
    path = classifier_path(16)
    assert path.parent == cache_home / "mixprec" and path.exists()
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left behind
    _, _, val_x, val_y = load_digit_images(16)
    acc = float((clf.predict(val_x.numpy()) == val_y.numpy()).mean())
    assert acc == pytest.approx(clf.val_accuracy, abs=1e-9)
    # A fresh process-level cache loads the file instead of training again.
    gan_module._load_classifier.cache_clear()
    monkeypatch.setattr(gan_module, "_train_classifier", lambda config: pytest.fail("retrained"))
    again = fid_classifier(16)
    assert again is not clf
    assert all(np.array_equal(a, b) for a, b in zip(again.weights, clf.weights))
    assert fid_classifier(16) is again  # the in-process cache


def test_classifier_training_is_deterministic_and_a_damaged_file_is_replaced(cache_home, monkeypatch, tmp_path):
    clf = fid_classifier(16)
    name = classifier_path(16).name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = classifier_path(16)
    assert path == tmp_path / "mixprec" / name  # the same key, another cache directory
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    fresh = fid_classifier(16)  # trains from scratch in this empty cache
    assert all(np.array_equal(a, b) for a, b in zip(fresh.weights, clf.weights))
    assert torch.load(path, weights_only=True)["val_accuracy"] == pytest.approx(clf.val_accuracy)


def test_classifier_cache_key_depends_on_the_config(monkeypatch):
    base = classifier_path(16).name
    monkeypatch.setattr(gan_module, "CLASSIFIER_VERSION", gan_module.CLASSIFIER_VERSION + 1)
    assert classifier_path(16).name != base
    assert classifier_path(32).name != base


def test_fid_separates_real_from_noise():
    clf = fid_classifier(16)
    train_x, _, val_x, _ = load_digit_images(16)
    real = gaussian_stats(clf.features(val_x.numpy()))
    floor = frechet_distance(*real, *gaussian_stats(clf.features(train_x.numpy())))
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = frechet_distance(*real, *gaussian_stats(clf.features(noise.numpy())))
    assert floor < 0.1 * noisy
    assert floor == pytest.approx(gan_module.fid_floor(16), rel=1e-12)


# --------------------------------------------------------------------------- model and loss


def test_shapes_and_ranges():
    torch.manual_seed(0)
    for size in (16, 32):
        model = DCGAN(nz=8, g_channels=4, d_channels=4, image_size=size)
        z = torch.randn(3, 8, 1, 1)
        with torch.no_grad():
            images = model.generator(z)
        assert images.shape == (3, 1, size, size) and float(images.abs().max()) <= 1.0
        with torch.no_grad():
            assert model.discriminator(images).shape == (3,)
        assert isinstance(model.generator.net[-1], torch.nn.Tanh)
    train_x, _, val_x, _ = load_digit_images(16)
    assert train_x.shape[1:] == (1, 16, 16) and float(train_x.min()) >= -1.0 and float(train_x.max()) <= 1.0
    assert float(train_x.min()) == -1.0 and float(train_x.max()) > 0.9


def test_gan_losses_reach_only_their_own_model():
    torch.manual_seed(0)
    model = DCGAN(nz=8, g_channels=4, d_channels=4)
    real, z = load_digit_images(16)[0][:16], torch.randn(16, 8, 1, 1)
    d_loss, g_loss = gan_losses(model, real, z)
    assert d_loss.dtype == g_loss.dtype == torch.float32
    d_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    g_loss.backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


def test_g_loss_value_and_running_stats_updated_once_per_batch():
    torch.manual_seed(0)
    model = DCGAN(nz=8, g_channels=4, d_channels=4)
    real, z = load_digit_images(16)[0][:16], torch.randn(16, 8, 1, 1)
    bn = model.discriminator.net[3]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    before = bn.running_mean.clone()
    torch.manual_seed(1)
    _, g_loss = gan_losses(model, real, z)
    assert int(bn.num_batches_tracked) == 2  # D(real) and D(fake.detach()), not D'(fake)
    assert not torch.equal(bn.running_mean, before)
    # g_loss is the non-saturating generator loss BCE(D(G(z)), 1) with batch statistics.
    fake = model.generator(z)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(model.discriminator(fake), torch.ones(16))
    torch.testing.assert_close(g_loss, expected, rtol=1e-6, atol=1e-6)


def test_two_adam_optimizers_with_dcgan_betas(tiny_task):
    model = tiny_task.build_model()
    opt_g, opt_d = tiny_task.build_optimizer(model)
    assert isinstance(opt_g, torch.optim.Adam) and isinstance(opt_d, torch.optim.Adam)
    assert opt_g.param_groups[0]["betas"] == opt_d.param_groups[0]["betas"] == (0.5, 0.999)
    assert {id(p) for p in opt_g.param_groups[0]["params"]} == {id(p) for p in model.generator.parameters()}
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {id(p) for p in model.discriminator.parameters()}


def test_loss_is_fp32_under_bf16_autocast(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_task.loss(model, next(tiny_task.train_batches(0)))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - 3 * math.log(2)) < 0.5  # D outputs ~0 at init: 2 ln 2 + ln 2


# --------------------------------------------------------------------------- batches


def test_train_batches_deterministic_with_their_own_noise(tiny_task):
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def take(seed, n=3):
        it = tiny_task.train_batches(seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert torch.equal(torch.get_rng_state(), state)
    real, z = a[0]
    assert real.shape == (TINY["batch_size"], 1, 16, 16) and z.shape == (TINY["batch_size"], TINY["nz"], 1, 1)
    for (ra, za), (rb, zb) in zip(a, b):
        assert torch.equal(ra, rb) and torch.equal(za, zb)
    assert not any(torch.equal(za, zc) for (_, za), (_, zc) in zip(a, c))
    assert not torch.equal(a[0][1], a[1][1]) and not torch.equal(a[0][0], a[1][0])


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(image_size=8), "8"),
        (dict(image_size=True), "True"),
        (dict(nz=0), "0"),
        (dict(g_channels=2.5), "2.5"),
        (dict(d_channels=-4), "-4"),
        (dict(batch_size=1), "1"),
        (dict(batch_size=5000), "5000"),
        (dict(lr=0), "0"),
        (dict(lr=float("nan")), "nan"),
        (dict(beta1=1.0), "1.0"),
        (dict(n_fid=1), "1"),
        (dict(sample_grid=3), "3"),
    ],
)
def test_bad_arguments_raise_usage_error_naming_the_value(kwargs, shown):
    with pytest.raises(UsageError) as info:
        gan(**kwargs)
    message = str(info.value)
    assert shown in message and "\n" not in message
    assert next(iter(kwargs)) in message


# --------------------------------------------------------------------------- training


def test_evaluate_restores_modes_and_is_deterministic(tiny_task):
    torch.manual_seed(0)
    model = tiny_task.build_model()
    model.train()
    metrics = tiny_task.evaluate(model)
    assert set(metrics) == {"fid"} and type(metrics["fid"]) is float and math.isfinite(metrics["fid"])
    assert all(m.training for m in model.modules())
    assert tiny_task.evaluate(model) == metrics
    model.eval()
    tiny_task.evaluate(model)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("policy", ["fp32", "bf16-mixed"])
def test_training_lowers_fid(tiny_task, policy):
    torch.manual_seed(0)
    untrained = tiny_task.evaluate(tiny_task.build_model())["fid"]
    steps = get_recipe("gan").tiny_steps
    result = mixprec.train(tiny_task, policy, steps=steps, monitor_every=0)
    assert result["status"] == "completed" and not result["skipped_steps"]
    assert all(math.isfinite(l) for l in result["losses"])
    # Measured (fp32 and bf16, seeds 0-4): FID falls to 0.27-0.68 of the untrained value.
    assert result["eval"]["fid"] < 0.85 * untrained, (result["eval"], untrained)


def test_sample_grid_png(tiny_task, tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = tiny_task.build_model()
    path = save_sample_grid(model, tmp_path / "grid.png", n=10)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L"
        w, h = img.size
    assert w > h > 0  # 4 columns, 3 rows of 16x16 digits
    assert model.training
    # The factory's sample_grid makes evaluate() write the grid too.
    out = tmp_path / "sub" / "eval.png"
    task = gan(**TINY, sample_grid=str(out))
    metrics = task.evaluate(model)
    assert out.exists() and set(metrics) == {"fid"}
    with pytest.raises(UsageError, match="n must"):
        save_sample_grid(model, tmp_path / "x.png", n=0)


def test_registry_entry():
    info = get_recipe("gan")
    assert isinstance(info, RecipeInfo) and info.factory is gan
    assert info.metric_key == "fid" and not info.higher_is_better
    lo, hi = info.expected_fp32
    assert 0 < lo < hi
