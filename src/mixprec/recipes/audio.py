"""Synthetic speech-like audio for the ``asr`` and ``tts`` recipes: "spoken symbols".

Nothing is downloaded: every waveform is synthesized here with numpy from a fixed data
seed, so every machine with the same numpy sees the same samples.

The alphabet
    :data:`SYMBOLS` holds 10 vowel-like symbols. Each one is a trajectory of three formants
    (vocal-tract resonances, Hz): five steady vowels (``a e i o u``, with the classic
    Peterson-Barney formant values) and five two-part glides that move from one vowel's
    formants to another's (``ai au oi ia ua``). Labels are ``1..10`` (``0`` is left free for
    the CTC blank), ``SYMBOLS[label - 1]`` names them.

How an utterance is made (:func:`synthesize`)
    * A voiced source: a harmonic series ``sum_h a_h(t) sin(h * phase(t))`` with ``phase``
      the running integral of the pitch ``f0(t)``, every harmonic below 0.95 x Nyquist, a
      ``1/h`` spectral tilt, random per-harmonic start phases.
    * Pitch: a per-utterance base pitch (log-uniform 90-220 Hz, "the speaker"), a per-symbol
      pitch jitter (about 5 %), a slow drift within each symbol and a falling declination
      over the utterance, smoothed over 20 ms.
    * Formant filtering: each harmonic's amplitude is the sum of three resonance (Lorentzian)
      curves at the formants' current frequencies; a per-utterance vocal-tract factor
      (0.95-1.05) and a per-symbol jitter (3 %) scale the symbol's formants; glides move
      with a smoothstep; tracks are smoothed over 10 ms.
    * Timing and loudness: per-symbol random duration, a raised-cosine attack and release,
      a random level per symbol, silences between symbols (or, with ``gap_ms=(0, 0)`` and
      ``floor`` > 0, continuous voicing that only dips between symbols) and at both ends.
    * Additive white noise at a random SNR (relative to the voiced part's mean power), and
      a random overall level.

Everything random is drawn from ``numpy.random.default_rng([data_seed, stream, index])``,
one generator per utterance: utterance ``i`` of a set does not depend on the set's size,
so a small set is a prefix of a larger one.

Also here: mu-law companding (:func:`mulaw_encode`, :func:`mulaw_decode`), a mel
filterbank and log-mel features in torch (:func:`mel_filterbank`, :func:`log_mel`;
torchaudio is not needed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE", "SYMBOLS", "N_SYMBOLS", "Symbol", "synthesize", "random_utterance",
    "utterance_set", "voiced_set", "mulaw_encode", "mulaw_decode", "mel_filterbank", "log_mel",
    "LOG_FLOOR",
]

SAMPLE_RATE = 8000
DATA_SEED = 20240611  # the fixed data seed (independent of any training seed)
LOG_FLOOR = 1e-6  # log-mel floor: log(max(mel power, LOG_FLOOR))


@dataclass(frozen=True)
class Symbol:
    """A spoken symbol: its name and its formants (F1, F2, F3 in Hz) at start and end."""

    name: str
    start: tuple[float, float, float]
    end: tuple[float, float, float]


_A = (730.0, 1090.0, 2440.0)
_E = (530.0, 1840.0, 2480.0)
_I = (270.0, 2290.0, 3010.0)
_O = (570.0, 840.0, 2410.0)
_U = (300.0, 870.0, 2240.0)

SYMBOLS: tuple[Symbol, ...] = (
    Symbol("a", _A, _A), Symbol("e", _E, _E), Symbol("i", _I, _I), Symbol("o", _O, _O),
    Symbol("u", _U, _U),
    Symbol("ai", _A, _I), Symbol("au", _A, _U), Symbol("oi", _O, _I), Symbol("ia", _I, _A),
    Symbol("ua", _U, _A),
)
N_SYMBOLS = len(SYMBOLS)

_FORMANT_GAIN = np.array([1.0, 0.7, 0.35])
_FORMANT_BW = np.array([90.0, 110.0, 170.0])  # full bandwidth, Hz
_CONTROL = 32  # samples between harmonic-amplitude updates (4 ms at 8 kHz)


# --------------------------------------------------------------------------- synthesis


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    """Moving average over ``n`` samples along axis 0 (edges padded with the end values)."""
    if n <= 1:
        return x
    pad = [(n // 2, n - 1 - n // 2)] + [(0, 0)] * (x.ndim - 1)
    xp = np.pad(x, pad, mode="edge")
    c = np.cumsum(xp, axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros((1,) + x.shape[1:]), c], axis=0)
    return (c[n:] - c[:-n]) / n


def _render(f0: np.ndarray, formants: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Formant-filtered harmonic series for pitch track ``f0 (N,)`` and ``formants (N, 3)``.

    Harmonic amplitudes change slowly, so they are computed every ``_CONTROL`` samples and
    interpolated linearly; the sines are float32 (fast, and far below the noise).
    """
    nyq = 0.95 * sr / 2
    n = len(f0)
    n_harm = max(1, int(nyq // float(f0.min())))
    h = np.arange(1, n_harm + 1, dtype=np.float64)
    ctrl = np.arange(0, n + _CONTROL, _CONTROL).clip(max=n - 1)
    freqs = f0[ctrl, None] * h  # (C, H)
    gain = np.full(freqs.shape, 0.02)
    for i in range(3):
        gain += _FORMANT_GAIN[i] / (1.0 + ((freqs - formants[ctrl, i:i + 1]) / (_FORMANT_BW[i] / 2)) ** 2)
    gain *= (freqs < nyq) / h
    pos = np.arange(n) / _CONTROL
    idx = np.minimum(pos.astype(np.int64), len(ctrl) - 2)
    w = (pos - idx)[:, None].astype(np.float32)
    gain = gain.astype(np.float32)
    amp = gain[idx] * (1 - w) + gain[idx + 1] * w  # (N, H)
    phase = np.mod(2 * math.pi * np.cumsum(f0) / sr, 2 * math.pi).astype(np.float32)
    start = rng.uniform(0, 2 * math.pi, n_harm).astype(np.float32)
    arg = phase[:, None] * h.astype(np.float32) + start  # < 2 pi (H + 1): float32 is exact enough
    return np.einsum("nh,nh->n", amp, np.sin(arg)).astype(np.float64)


def synthesize(rng: np.random.Generator, labels: Sequence[int], *, sr: int = SAMPLE_RATE,
               dur_ms: tuple[float, float] = (80.0, 160.0), gap_ms: tuple[float, float] = (20.0, 60.0),
               edge_ms: tuple[float, float] = (20.0, 80.0), snr_db: tuple[float, float] = (10.0, 30.0),
               floor: float = 0.0, rms: tuple[float, float] = (0.05, 0.2)) -> np.ndarray:
    """One utterance of the symbols ``labels`` (each in ``1..N_SYMBOLS``), float32 in [-1, 1].

    Ranges are ``(low, high)`` for uniform draws: per-symbol duration, the silence between
    symbols, the silence at each end, the SNR in dB, and the final RMS level of the voiced
    part. ``floor`` is the envelope's minimum between symbols (0: each symbol fades in from
    and out to silence).
    """
    n_sym = len(labels)
    ms = sr / 1000.0
    base_f0 = math.exp(rng.uniform(math.log(90.0), math.log(220.0)))
    tract = rng.uniform(0.95, 1.05)
    lead = int(rng.uniform(*edge_ms) * ms)
    pieces_f0, pieces_fm, pieces_env = [], [], []

    def silence(n: int, f0: float, fm: np.ndarray) -> None:
        pieces_f0.append(np.full(n, f0))
        pieces_fm.append(np.repeat(fm[None], n, axis=0))
        pieces_env.append(np.full(n, floor))

    first = SYMBOLS[labels[0] - 1] if n_sym else SYMBOLS[0]
    silence(lead, base_f0, np.array(first.start) * tract)
    for k, label in enumerate(labels):
        sym = SYMBOLS[label - 1]
        n = max(8, int(rng.uniform(*dur_ms) * ms))
        t = np.linspace(0.0, 1.0, n)
        declination = 1.0 - 0.1 * (k / max(1, n_sym - 1))
        f0_sym = base_f0 * declination * math.exp(rng.normal(0.0, 0.05))
        pieces_f0.append(f0_sym * (1.0 + rng.uniform(-0.04, 0.04) * (t - 0.5)))
        jitter = tract * np.exp(rng.normal(0.0, 0.03, 3))
        s = t * t * (3 - 2 * t)  # smoothstep glide
        fm = (np.array(sym.start)[None] * (1 - s[:, None]) + np.array(sym.end)[None] * s[:, None]) * jitter
        pieces_fm.append(fm)
        attack = min(n // 2, int(rng.uniform(10, 20) * ms))
        release = min(n // 2, int(rng.uniform(15, 30) * ms))
        env = np.ones(n)
        env[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, attack, endpoint=False))
        env[n - release:] = 0.5 + 0.5 * np.cos(np.linspace(0, math.pi, release))
        pieces_env.append((floor + (1 - floor) * env) * rng.uniform(0.6, 1.0))
        gap = int(rng.uniform(*gap_ms) * ms) if k < n_sym - 1 else int(rng.uniform(*edge_ms) * ms)
        if gap:
            silence(gap, pieces_f0[-1][-1], fm[-1])

    f0 = _smooth(np.concatenate(pieces_f0), int(20 * ms))
    formants = _smooth(np.concatenate(pieces_fm), int(10 * ms))
    env = np.concatenate(pieces_env)
    voiced = _render(f0, formants, rng, sr) * env
    active = env > max(floor, 0.0) + 1e-3
    power = float(np.mean(voiced[active] ** 2)) if active.any() else float(np.mean(voiced ** 2))
    power = max(power, 1e-12)
    snr = rng.uniform(*snr_db)
    noise = rng.normal(0.0, math.sqrt(power / 10 ** (snr / 10)), voiced.shape)
    wave = (voiced + noise) * (rng.uniform(*rms) / math.sqrt(power))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def random_utterance(rng: np.random.Generator, min_symbols: int = 3, max_symbols: int = 6,
                     **synth_kwargs) -> tuple[np.ndarray, list[int]]:
    """(waveform, labels): ``min_symbols..max_symbols`` uniform random symbols, synthesized."""
    n = int(rng.integers(min_symbols, max_symbols + 1))
    labels = [int(x) for x in rng.integers(1, N_SYMBOLS + 1, n)]
    return synthesize(rng, labels, **synth_kwargs), labels


STREAM_TRAIN, STREAM_VAL = 1, 2  # ASR utterances
STREAM_VOICED_TRAIN, STREAM_VOICED_VAL = 3, 4  # TTS waveforms


@functools.lru_cache(maxsize=16)
def utterance_set(stream: int, n: int, min_symbols: int = 3, max_symbols: int = 6
                  ) -> tuple[tuple[np.ndarray, ...], tuple[tuple[int, ...], ...]]:
    """``n`` utterances of stream ``stream`` (``STREAM_TRAIN`` or ``STREAM_VAL``): (waves, labels).

    Utterance ``i`` comes from ``default_rng([DATA_SEED, stream, i])``. Cached per process and
    shared: treat the arrays as read-only.
    """
    waves, labels = [], []
    for i in range(n):
        w, lab = random_utterance(np.random.default_rng([DATA_SEED, stream, i]), min_symbols, max_symbols)
        waves.append(w)
        labels.append(tuple(lab))
    return tuple(waves), tuple(labels)


@functools.lru_cache(maxsize=16)
def voiced_set(stream: int, n: int, n_samples: int) -> np.ndarray:
    """``(n, n_samples)`` float32: continuous voiced waveforms for the WaveNet (TTS) recipe.

    Symbols follow each other without silences (the envelope dips to 0.35 between them),
    high SNR (30-40 dB), RMS 0.1-0.25. Waveform ``i`` comes from
    ``default_rng([DATA_SEED, stream, i])``; cached per process and shared (read-only).
    """
    out = np.empty((n, n_samples), dtype=np.float32)
    mean_sym = 0.12 * SAMPLE_RATE
    for i in range(n):
        rng = np.random.default_rng([DATA_SEED, stream, i])
        k = int(n_samples / mean_sym) + 2
        labels = [int(x) for x in rng.integers(1, N_SYMBOLS + 1, k)]
        w = synthesize(rng, labels, dur_ms=(80.0, 160.0), gap_ms=(0.0, 0.0), edge_ms=(0.0, 0.0),
                       snr_db=(30.0, 40.0), floor=0.35, rms=(0.1, 0.25))
        while len(w) < n_samples:  # rare: the draws came out short
            w = np.concatenate([w, w])
        out[i] = w[:n_samples]
    return out


# --------------------------------------------------------------------------- mu-law


def mulaw_encode(x: torch.Tensor, mu: int = 255) -> torch.Tensor:
    """Samples in [-1, 1] (clamped) -> ``torch.long`` classes ``0..mu`` (mu-law, rounded)."""
    x = torch.as_tensor(x, dtype=torch.float32).clamp(-1.0, 1.0)
    f = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.round((f + 1) / 2 * mu).long().clamp_(0, mu)


def mulaw_decode(q: torch.Tensor, mu: int = 255) -> torch.Tensor:
    """Classes ``0..mu`` -> float32 samples in [-1, 1] (the inverse of :func:`mulaw_encode`)."""
    f = 2 * torch.as_tensor(q).to(torch.float32) / mu - 1
    return torch.sign(f) * (torch.pow(1.0 + mu, f.abs()) - 1) / mu


# --------------------------------------------------------------------------- features


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_fft: int = 256, n_mels: int = 40, sr: int = SAMPLE_RATE, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """``(n_mels, n_fft // 2 + 1)`` triangular HTK-mel filters (each with unit peak)."""
    fmax = sr / 2 if fmax is None else fmax
    bins = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    return torch.tensor(fb, dtype=torch.float32)


def log_mel(wave: torch.Tensor, n_fft: int = 256, hop: int = 80, n_mels: int = 40,
            sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Log-mel power spectrogram: waveform ``(..., L)`` -> ``(..., 1 + L // hop, n_mels)`` float32.

    ``torch.stft`` with a Hann window of ``n_fft`` samples, centred frames every ``hop``
    samples, zero padding at both ends (so a batch of zero-padded waveforms gives, for each
    one, exactly the frames it gives alone), power spectrum through :func:`mel_filterbank`,
    then ``log(max(., LOG_FLOOR))``. Not normalized (the recipes normalize with
    training-set statistics).
    """
    wave = torch.as_tensor(wave, dtype=torch.float32)
    lead = wave.shape[:-1]
    spec = torch.stft(wave.reshape(-1, wave.shape[-1]), n_fft=n_fft, hop_length=hop,
                      window=torch.hann_window(n_fft), center=True, pad_mode="constant",
                      return_complex=True)
    power = spec.real.square() + spec.imag.square()  # (B, freq, frames)
    mel = mel_filterbank(n_fft, n_mels, sr) @ power
    out = torch.log(mel.clamp_min(LOG_FLOOR)).transpose(1, 2)
    return out.reshape(*lead, out.shape[1], n_mels).contiguous()
