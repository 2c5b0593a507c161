"""The ``gan`` recipe: a DCGAN on scikit-learn's handwritten digits, scored by FID.

What it is
    A DCGAN (Radford et al., 2016) at 16x16 (``image_size=32`` adds a layer to each
    model). Generator: z ``(B, 32, 1, 1)`` -> ConvTranspose2d to 128x4x4 -> BatchNorm,
    ReLU -> ConvTranspose2d to 64x8x8 -> BatchNorm, ReLU -> ConvTranspose2d to 1x16x16 ->
    Tanh (198k parameters). Discriminator: Conv2d to 64x8x8 -> LeakyReLU(0.2) -> Conv2d to
    128x4x4 -> BatchNorm, LeakyReLU -> 4x4 Conv2d to one logit (134k parameters). DCGAN
    init (N(0, 0.02) convs, N(1, 0.02) BatchNorm scales). One ``nn.Module``
    (:class:`DCGAN`) holds ``.generator`` and ``.discriminator``; ``build_optimizer``
    returns ``[opt_g, opt_d]``, two Adam (lr 2e-4, betas (0.5, 0.999)): two models, two
    optimizers, one loss scaler, all stepped by the engine in one step.

The update: simultaneous gradient descent, not the paper's alternating updates
    The engine runs one backward and one step per micro-batch, so ``loss`` returns
    ``d_loss + g_loss`` and each optimizer sees only its own model's gradient:
    ``fake = G(z)``; ``d_loss = BCE(D(real), 1) + BCE(D(fake.detach()), 0)``;
    ``g_loss = BCE(D'(fake), 1)`` (the non-saturating generator loss), where ``D'`` is
    the discriminator called through ``torch.func.functional_call`` with its parameters
    detached, so g_loss's gradient flows through D' into G only. Both models step on the
    same batch from the same starting point (the original DCGAN steps D, then G against
    the updated D). All three losses are BCE-with-logits on ``logits.float()``.
    BatchNorm: D' runs in training mode on the fake batch (the same batch statistics as
    ``D(fake.detach())``, so its logits are equal), but it is handed *clones* of D's
    buffers, so its running-statistic updates are thrown away: each step updates D's
    running statistics exactly twice (once for the real, once for the fake batch) and
    G's once.

The data
    The digits of :mod:`mixprec.recipes.digits` (1,437 train / 360 validation, real 8x8
    scans) upsampled bilinearly to 16x16 and scaled to [-1, 1]. ``train_batches(seed)``
    yields ``(real, z)``: real images in epochs of a seeded permutation and the noise ``z``
    drawn from the same seeded ``torch.Generator`` (never the global RNG), so a run is
    deterministic.

Metric: FID in a digits classifier's feature space (lower is better)
    The feature extractor is an MLP classifier (256-128-64-10, ReLU; 60 epochs of AdamW,
    batch 512, on the training digits, seed 0, fp32, one thread; a second or two) trained
    once deterministically and cached in ``$XDG_CACHE_HOME/mixprec/`` (default
    ``~/.cache/mixprec/``; written atomically, named by a hash of its configuration, also
    cached per process); it reaches 97.8% validation accuracy (97.2% at 32x32).
    Features are its 64 penultimate ReLU units, computed in float64 numpy: the ruler does not change with the run's precision (neither autocast nor the
    fp16 emulation reaches numpy), so an FID difference between two runs is a difference
    between their generators. ``evaluate()`` generates 1,000 images from a fixed noise set
    (seed ``FID_Z_SEED``) with the generator in eval mode under no_grad, and returns
    ``fid``: the Fréchet distance (:func:`frechet_distance`, float64, ``scipy.linalg.sqrtm``)
    between the Gaussians fitted to their features and to the 360 validation digits'.
    Floor: real vs real (validation against training digits, :func:`fid_floor`) 6.3
    (13.8 at 32x32). Ceiling: an untrained generator, 1308 (in eval mode its output is
    nearly a flat grey image, whatever the seed).
    The discriminator and generator losses are not reported: a GAN's losses swing with
    the balance of the two players and say little about the samples.
    ``sample_grid="path.png"`` makes ``evaluate()`` also write :func:`save_sample_grid`.

Expected numbers (fp32, defaults, 300 steps; 2-core AMD EPYC with AVX512_BF16, torch 2.13)
    * fid 16.6 (seed 0) and 15.1 (seed 1): GAN runs vary a lot from seed to seed (other
      seeds and settings gave 15-30); the loss (d_loss + g_loss) starts at 2.1, peaks
      near 2.8 as D wins, settles at 2.16 over the last fifth. 14.5 s for the 300 steps
      (48 ms median step) on a quiet machine, about 22 s for the whole ``mixprec train
      gan`` with the classifier cached (its first training adds a second or two).
    * bf16-mixed: fid 15.6, final loss 0.03% from fp32 (seed-to-seed 1.66%); 1.20x faster
      (interleaved, quiet machine). emulate:fp16-mixed: fid 16.3, final loss 0.77% from
      fp32, no step skipped by both optimizers; the loss scale backs off from 65536 to
      2048 over the first steps and stays there. Nothing needed fixing: the losses are
      computed in fp32 and BatchNorm keeps fp32 statistics. The per-module gradient
      cosine between the runs goes negative at some sampled steps: the two games follow
      different trajectories (as two fp32 seeds do), judged by the noise floor.

Use it as ``mixprec.recipes.gan.gan(**kwargs)`` or by name: ``mixprec train gan``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.digits import load_digits_split, upsample
from mixprec.recipes.info import RecipeInfo
from mixprec.task import Task

_check_int = functools.partial(check_int, "gan")
_check_float = functools.partial(check_float, "gan")

__all__ = ["DCGAN", "Discriminator", "FIDClassifier", "Generator", "fid_classifier", "fid_floor",
           "frechet_distance", "gan", "gaussian_stats", "load_digit_images", "save_sample_grid"]

IMAGE_SIZES = (16, 32)
FID_Z_SEED = 1234  # the fixed noise the FID is computed over (independent of the training seed)
GRID_Z_SEED = 4321  # the fixed noise of save_sample_grid

# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def load_digit_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, val_x, val_y)``: the digits split of :mod:`mixprec.recipes.digits`,
    upsampled to ``image_size`` and scaled to [-1, 1] (the generator's Tanh range). Cached per
    process: treat the tensors as read-only."""
    train_x, train_y, val_x, val_y = load_digits_split()
    scale = lambda x: (upsample(x, image_size) * 2.0 - 1.0).contiguous()  # noqa: E731
    return scale(train_x), train_y, scale(val_x), val_y


# --------------------------------------------------------------------------- model


class Generator(nn.Module):
    """z ``(B, nz, 1, 1)`` -> images ``(B, 1, S, S)`` in [-1, 1]: ConvTranspose2d + BatchNorm +
    ReLU blocks doubling the size from 4x4, Tanh out (Radford et al., 2016)."""

    def __init__(self, nz: int = 32, channels: int = 64, image_size: int = 16):
        super().__init__()
        n_up = int(math.log2(image_size)) - 2  # 4x4 -> image_size in stride-2 steps
        width = channels * 2 ** (n_up - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, 1, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """images ``(B, 1, S, S)`` -> logits ``(B,)``: stride-2 Conv2d + LeakyReLU(0.2) down to
    4x4 (BatchNorm in the middle layers, none on the input layer), a 4x4 conv to one logit."""

    def __init__(self, channels: int = 64, image_size: int = 16):
        super().__init__()
        n_down = int(math.log2(image_size)) - 2
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


class DCGAN(nn.Module):
    """The two models of the GAN in one module: ``.generator`` and ``.discriminator``."""

    def __init__(self, nz: int = 32, g_channels: int = 64, d_channels: int = 64, image_size: int = 16):
        super().__init__()
        self.nz = nz
        self.generator = Generator(nz, g_channels, image_size)
        self.discriminator = Discriminator(d_channels, image_size)
        # DCGAN init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images for the noise ``z``."""
        return self.generator(z)


def gan_losses(model: DCGAN, real: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_loss, g_loss)`` of one batch in the simultaneous formulation (see the module doc):
    ``d_loss`` has gradients only for the discriminator, ``g_loss`` only for the generator."""
    D = model.discriminator
    fake = model.generator(z)
    ones = torch.ones(real.shape[0], device=real.device)
    zeros = torch.zeros(fake.shape[0], device=fake.device)
    d_loss = (F.binary_cross_entropy_with_logits(D(real).float(), ones)
              + F.binary_cross_entropy_with_logits(D(fake.detach()).float(), zeros))
    # D' = D with its parameters detached: g_loss's gradient flows through D' into the
    # generator only. Its BatchNorm statistics are the fake batch's (as in D(fake.detach())
    # above), and its running-stat updates go to throwaway copies of the buffers, so each
    # step updates D's running statistics once per real and once per fake batch.
    params = {name: p.detach() for name, p in D.named_parameters()}
    buffers = {name: b.clone() for name, b in D.named_buffers()}
    g_logits = torch.func.functional_call(D, {**params, **buffers}, (fake,))
    g_loss = F.binary_cross_entropy_with_logits(g_logits.float(), torch.ones_like(zeros))
    return d_loss, g_loss


# --------------------------------------------------------------------------- FID


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of ``features`` ``(N, d)``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs an (N >= 2, d) array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    As in the reference FID code, a product that is singular enough for ``sqrtm`` to fail
    is retried with 1e-6 added to both diagonals, and the tiny imaginary part that
    round-off gives the square root is dropped."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular": handled below, as in the reference code
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(mu1.size) * 1e-6
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # round-off can take an exact match a hair below zero


@dataclass(frozen=True)
class FIDClassifier:
    """The FID's feature extractor: an MLP digits classifier, evaluated in float64 numpy.

    ``weights``/``biases`` per layer (float64); ``features(images)`` are the ReLU outputs of
    the penultimate layer; ``val_accuracy`` its accuracy on the validation digits."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    val_accuracy: float
    config: dict

    def _hidden(self, images) -> np.ndarray:
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            x = np.maximum(x @ w.T + b, 0.0)
        return x

    def features(self, images) -> np.ndarray:
        """Penultimate-layer features ``(N, d)`` of images ``(N, 1, S, S)`` in [-1, 1]."""
        return self._hidden(images)

    def predict(self, images) -> np.ndarray:
        return (self._hidden(images) @ self.weights[-1].T + self.biases[-1]).argmax(axis=1)


CLASSIFIER_VERSION = 1  # bump when the training code changes: it is part of the cache key


def _classifier_config(image_size: int) -> dict:
    return {"version": CLASSIFIER_VERSION, "image_size": image_size, "hidden": [128, 64], "epochs": 60,
            "batch_size": 512, "lr": 1e-3, "weight_decay": 1e-4, "seed": 0}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixprec"


def _train_classifier(config: dict) -> dict[str, torch.Tensor]:
    """Train the MLP in fp32 with its own seeded RNG (the global RNG is left as it was), on
    one thread: its ops are tiny (one thread is faster than two here), and the result
    then does not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_classifier_single_thread(config)
    finally:
        torch.set_num_threads(threads)


def _train_classifier_single_thread(config: dict) -> dict[str, torch.Tensor]:
    train_x, train_y, val_x, val_y = load_digit_images(config["image_size"])
    sizes = [train_x[0].numel(), *config["hidden"], 10]
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
        torch.manual_seed(config["seed"])
        gen = torch.Generator().manual_seed(config["seed"])
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        net = nn.Sequential(nn.Flatten(), *layers)
        opt = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        bs = config["batch_size"]
        for _ in range(config["epochs"]):
            order = torch.randperm(len(train_y), generator=gen)
            for start in range(0, len(order), bs):
                rows = order[start:start + bs]
                loss = F.cross_entropy(net(train_x[rows]), train_y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            accuracy = int((net(val_x).argmax(1) == val_y).sum()) / len(val_y)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    state = {f"w{i}": m.weight.detach().clone() for i, m in enumerate(linears)}
    state.update({f"b{i}": m.bias.detach().clone() for i, m in enumerate(linears)})
    state["val_accuracy"] = torch.tensor(accuracy, dtype=torch.float64)
    return state


def _write_atomic(path: Path, state: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@functools.lru_cache(maxsize=8)
def _load_classifier(config_json: str, path: str) -> FIDClassifier:
    config = json.loads(config_json)
    state = None
    if os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache file is retrained and replaced
            state = None
    if state is None:
        state = _train_classifier(config)
        try:
            _write_atomic(Path(path), state)
        except OSError:
            pass  # an unwritable cache costs a retrain next time, nothing else
    n = len(config["hidden"]) + 1
    return FIDClassifier(
        weights=tuple(state[f"w{i}"].double().numpy() for i in range(n)),
        biases=tuple(state[f"b{i}"].double().numpy() for i in range(n)),
        val_accuracy=float(state["val_accuracy"]),
        config=config,
    )


def classifier_path(image_size: int = 16) -> Path:
    """Where the FID classifier for ``image_size`` is cached: ``$XDG_CACHE_HOME/mixprec/``
    (default ``~/.cache/mixprec/``), named by a hash of its configuration."""
    config_json = json.dumps(_classifier_config(image_size), sort_keys=True)
    key = hashlib.sha256(config_json.encode()).hexdigest()[:16]
    return _cache_dir() / f"digits-fid-classifier-{image_size}px-{key}.pt"


def fid_classifier(image_size: int = 16) -> FIDClassifier:
    """The FID feature extractor for ``image_size`` digits: trained once (deterministically,
    a few seconds), then loaded from :func:`classifier_path` (and cached per process)."""
    if image_size not in IMAGE_SIZES:
        raise UsageError(f"gan: image_size must be one of {list(IMAGE_SIZES)}, got {image_size!r}")
    config_json = json.dumps(_classifier_config(image_size), sort_keys=True)
    return _load_classifier(config_json, str(classifier_path(image_size)))


def fid_floor(image_size: int = 16) -> float:
    """FID of real validation digits against real training digits: what a perfect
    generator would score against the validation set, at these sample sizes."""
    clf = fid_classifier(image_size)
    train_x, _, val_x, _ = load_digit_images(image_size)
    return frechet_distance(*gaussian_stats(clf.features(val_x.numpy())),
                            *gaussian_stats(clf.features(train_x.numpy())))


# --------------------------------------------------------------------------- samples


def _generate(model: DCGAN, z: torch.Tensor) -> torch.Tensor:
    """Images for ``z`` from the generator in eval mode under no_grad (flags restored), fp32."""
    modes = [(m, m.training) for m in model.modules()]
    model.generator.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            return model.generator(z.to(device)).float()
    finally:
        for m, was_training in modes:
            m.training = was_training


def save_sample_grid(model: DCGAN, path: str | os.PathLike, n: int = 64) -> Path:
    """Write a PNG grid of ``n`` generated digits (fixed noise, generator in eval mode) to
    ``path``, atomically; returns the path."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UsageError(f"save_sample_grid: n must be a positive integer, got {n!r}")
    from PIL import Image

    z = torch.randn(int(n), model.nz, 1, 1, generator=torch.Generator().manual_seed(GRID_Z_SEED))
    images = ((_generate(model, z).cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size, pad = images.shape[-1], 1
    grid = np.zeros((rows * (size + pad) + pad, cols * (size + pad) + pad), dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[pad + r * (size + pad):pad + r * (size + pad) + size, pad + c * (size + pad):pad + c * (size + pad) + size] = img
    scale = max(1, 256 // grid.shape[1])  # nearest-neighbour upscaling so small grids stay visible
    picture = Image.fromarray(grid, mode="L").resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------- task


def gan(image_size: int = 16, nz: int = 32, g_channels: int = 64, d_channels: int = 64, batch_size: int = 64,
        lr: float = 2e-4, beta1: float = 0.5, n_fid: int = 1000, sample_grid: str | None = None) -> Task:
    """The ``gan`` Task: DCGAN on the digits, simultaneous updates, FID (see the module doc)."""
    if isinstance(image_size, bool) or image_size not in IMAGE_SIZES:
        raise UsageError(f"gan: image_size must be one of {list(IMAGE_SIZES)}, got {image_size!r}")
    for name, value in [("nz", nz), ("g_channels", g_channels), ("d_channels", d_channels),
                        ("batch_size", batch_size)]:
        _check_int(name, value)
    _check_int("n_fid", n_fid, minimum=2)
    if batch_size < 2:
        raise UsageError(f"gan: batch_size must be at least 2 (BatchNorm needs a batch), got {batch_size!r}")
    if image_size == 32 and g_channels < 2:
        raise UsageError(f"gan: g_channels must be at least 2 for image_size 32, got {g_channels!r}")
    _check_float("lr", lr, low=0.0)
    _check_float("beta1", beta1, low=0.0, low_inclusive=True, high=1.0)
    if sample_grid is not None and not isinstance(sample_grid, (str, os.PathLike)):
        raise UsageError(f"gan: sample_grid must be a file path (str) or None, got {sample_grid!r}")

    train_x, _, val_x, _ = load_digit_images(image_size)
    if batch_size > len(train_x):
        raise UsageError(f"gan: batch_size={batch_size} exceeds the {len(train_x)} training digits")
    clf = fid_classifier(image_size)  # trained or loaded here, outside any run's autocast
    val_mu, val_sigma = gaussian_stats(clf.features(val_x.numpy()))
    fid_z = torch.randn(n_fid, nz, 1, 1, generator=torch.Generator().manual_seed(FID_Z_SEED))

    def build_model() -> nn.Module:
        return DCGAN(nz, g_channels, d_channels, image_size)

    def build_optimizer(model: nn.Module) -> list[torch.optim.Optimizer]:
        betas = (beta1, 0.999)
        return [torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)]

    def train_batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(seed))
        while True:  # epochs of a fresh permutation; a last partial batch is dropped
            order = torch.randperm(len(train_x), generator=gen)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                real = train_x[order[start:start + batch_size]]
                z = torch.randn(batch_size, nz, 1, 1, generator=gen)
                yield real, z

    def loss(model: nn.Module, batch) -> torch.Tensor:
        real, z = batch
        device = next(model.parameters()).device
        d_loss, g_loss = gan_losses(model, real.to(device, non_blocking=True), z.to(device, non_blocking=True))
        return d_loss + g_loss

    def evaluate(model: nn.Module) -> dict[str, float]:
        images = _generate(model, fid_z).cpu().numpy()  # the one host sync
        mu, sigma = gaussian_stats(clf.features(images))
        if sample_grid is not None:
            save_sample_grid(model, sample_grid)
        return {"fid": frechet_distance(mu, sigma, val_mu, val_sigma)}

    return Task(name="gan", build_model=build_model, build_optimizer=build_optimizer,
                train_batches=train_batches, loss=loss, evaluate=evaluate)


RECIPE = RecipeInfo(
    name="gan",
    factory=gan,
    domain="generative (GAN)",
    model="DCGAN: ConvTranspose2d generator, Conv2d discriminator, 16x16, simultaneous updates",
    data="scikit-learn digits upsampled to 16x16, scaled to [-1, 1]",
    metric="fid (Frechet distance in an MLP digits classifier's feature space)",
    description="A GAN: two models, two Adam optimizers, one loss scaler; FID against validation digits.",
    metric_key="fid",
    higher_is_better=False,
    expected_fp32=(12.0, 30.0),
    verify_steps=300,
    tiny=dict(nz=8, g_channels=8, d_channels=8, batch_size=32, n_fid=256, lr=5e-3),
    tiny_steps=40,
)
