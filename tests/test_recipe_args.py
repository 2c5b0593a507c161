"""The recipes' shared argument checks (mixprec.recipes._args): one-line errors naming the
value and the valid range, and the CLI's exit 2 for them."""

from __future__ import annotations

import pytest

from mixprec.errors import UsageError
from mixprec.recipes._args import check_float, check_int
from mixprec.recipes.gan import gan
from mixprec.recipes.vision import vision


@pytest.mark.parametrize("value, bounds, shown", [
    (0.0, dict(low=0.0), "(0.0, inf)"),
    (-1.0, dict(low=0.0, low_inclusive=True), "[0.0, inf)"),
    (1.0, dict(low=0.0, high=1.0), "(0.0, 1.0)"),
    (1.5, dict(low=0.0, high=1.0, high_inclusive=True), "(0.0, 1.0]"),
    (float("inf"), dict(low=0.0), "(0.0, inf)"),
    (True, dict(low=0.0), "(0.0, inf)"),
])
def test_check_float_names_the_value_and_the_interval(value, bounds, shown):
    with pytest.raises(UsageError) as info:
        check_float("demo", "x", value, **bounds)
    assert str(info.value) == f"demo: x must be a finite number in {shown}, got {value!r}"


def test_check_float_accepts_the_closed_ends_only_when_asked():
    check_float("demo", "x", 0.0, low=0.0, low_inclusive=True)
    check_float("demo", "x", 1.0, low=0.0, high=1.0, high_inclusive=True)


@pytest.mark.parametrize("value, minimum, what", [(0, 1, "a positive integer"), (-1, 0, "an integer >= 0"),
                                                  (2.0, 1, "a positive integer"), (False, 0, "an integer >= 0")])
def test_check_int_names_the_value(value, minimum, what):
    with pytest.raises(UsageError) as info:
        check_int("demo", "n", value, minimum)
    assert str(info.value) == f"demo: n must be {what}, got {value!r}"


def test_gan_beta1_is_zero_to_below_one():
    gan(beta1=0.0)  # Adam with no first-moment averaging is valid
    with pytest.raises(UsageError, match=r"gan: beta1 must be a finite number in \[0.0, 1.0\), got -0.1"):
        gan(beta1=-0.1)


def test_vision_bn_momentum_may_be_one():
    vision(bn_momentum=1.0)  # BatchNorm then uses each batch's statistics: valid
    with pytest.raises(UsageError, match=r"vision: bn_momentum must be a finite number in \(0.0, 1.0\], got 1.5"):
        vision(bn_momentum=1.5)


def test_cli_exits_2_with_the_recipes_message(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = invoke(["train", "gan", "--task-arg", "beta1=-0.1", "--steps", "1", "--no-progress"])
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "beta1" in err and "-0.1" in err and "[0.0, 1.0)" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
