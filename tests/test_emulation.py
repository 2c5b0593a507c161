"""EmulatedPrecision: matmul-like ops see inputs rounded to the format, bit for bit what
quantize-then-op computes outside the mode; nothing else changes; overflow appears where
native fp16 autocast overflows; round_grads rounds gradients; real models go through it;
dtype propagation (tensors a rounded op produced are marked low precision and the ops
consuming them are rounded too, following autocast's dtype rules).
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.emulation import AUTOCAST_FP32_OPS, EmulatedPrecision, emulated_matmul_ops
from mixprec.errors import UsageError
from mixprec.quantization import quantize


def q16(t):
    return quantize(t, "fp16")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (a - b).abs().max()


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "tf32"])
def test_linear_equals_linear_of_quantized_inputs(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = randn(4, 16)
    with EmulatedPrecision(fmt) as mode:
        y = lin(x)
    expected = F.linear(quantize(x, fmt), quantize(lin.weight, fmt), quantize(lin.bias, fmt))
    assert y.dtype == torch.float32
    assert_bitwise(y, expected.detach())
    assert not torch.equal(y, lin(x))  # rounding changed something
    assert mode.intercepted == {"torch.nn.functional.linear": 1}  # once: no recursion


def test_outside_the_mode_nothing_changes():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = randn(4, 16)
    before = lin(x)
    with EmulatedPrecision("fp8_e4m3", round_outputs=True):
        lin(x)
    after = lin(x)
    assert_bitwise(after, before)
    assert_bitwise(after, F.linear(x, lin.weight, lin.bias))
    assert not torch.equal(after, F.linear(q16(x), q16(lin.weight), q16(lin.bias)))


def test_non_matmul_ops_run_untouched_in_fp32():
    x = torch.full((4,), 1.0 + 2**-20)  # not representable in fp16
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = (x * 3 + 1).exp().sum()
        z = F.layer_norm(x, (4,)) + F.gelu(x)
    assert y.item() == (x * 3 + 1).exp().sum().item()
    assert torch.equal(z, F.layer_norm(x, (4,)) + F.gelu(x))
    assert not mode.intercepted


def test_round_outputs_rounds_the_result():
    a, b = randn(8, 8, seed=1), randn(8, 8, seed=2)
    with EmulatedPrecision("fp16") as m:
        plain = a @ b
    with EmulatedPrecision("fp16", round_outputs=True):
        rounded = a @ b
    assert_bitwise(plain, q16(a) @ q16(b))
    assert_bitwise(rounded, q16(q16(a) @ q16(b)))
    assert not torch.equal(plain, rounded)
    assert m.intercepted["torch.Tensor.matmul"] == 1


# --------------------------------------------------------------------------- overflow


def test_fp16_overflow_matches_native_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight.uniform_(1.0, 2.0)
        # rows 0-2: outputs in [8, 32] * 100 (finite in fp16); rows 3-5: * 1e4 (overflow),
        # row 4 negative -> -inf.
        lin.weight[:3] *= 100
        lin.weight[3:] *= 1e4
        lin.weight[4] *= -1
    x = torch.empty(5, 8).uniform_(1.0, 2.0, generator=gen(3))
    with torch.autocast("cpu", dtype=torch.float16):
        native = lin(x)
    assert native.dtype == torch.float16
    with EmulatedPrecision("fp16", round_outputs=True):
        emulated = lin(x)
    assert torch.isinf(native).any() and not torch.isinf(native).all()
    assert torch.equal(torch.isinf(emulated), torch.isinf(native))
    assert torch.equal(torch.isneginf(emulated), torch.isneginf(native))
    finite = torch.isfinite(native)
    torch.testing.assert_close(emulated[finite], native[finite].float(), rtol=2e-3, atol=0)
    with EmulatedPrecision("fp16"):  # without round_outputs the fp32 result stays finite
        assert torch.isfinite(lin(x)).all()


# --------------------------------------------------------------------------- propagation


def _amplified_linear(seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(16, 16)
    x = randn(64, 16, seed=seed + 1)
    return lin, x


def test_propagated_overflow_matches_native_autocast():
    # linear(x) * 2e5: native autocast multiplies the fp16 *tensor* in fp16 -> inf where
    # |linear(x)| > 65504 / 2e5; emulation must give inf at exactly those elements.
    lin, x = _amplified_linear()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            native = lin(x) * 2e5
        with EmulatedPrecision("fp16", round_outputs=True) as mode:
            emulated = lin(x) * 2e5
    assert native.dtype == torch.float16 and emulated.dtype == torch.float32
    assert mode.propagate and mode.is_marked(emulated)
    inf = torch.isinf(native)
    assert 0.2 < inf.float().mean().item() < 0.8  # both kinds of element are there
    assert torch.equal(torch.isinf(emulated), inf)
    assert torch.equal(torch.isneginf(emulated), torch.isneginf(native))
    assert_bitwise(emulated[~inf], native[~inf].float())
    assert_bitwise(q16(emulated), emulated)


def test_propagate_false_restores_the_old_behaviour():
    lin, x = _amplified_linear()
    with torch.no_grad():
        with EmulatedPrecision("fp16", round_outputs=True, propagate=False) as mode:
            y = lin(x)
            amplified = y * 2e5
    assert not mode.propagate and not mode.is_marked(y)
    assert torch.isfinite(amplified).all()  # the old, missed overflow
    assert_bitwise(amplified, y * 2e5)
    assert_bitwise(y, q16(F.linear(q16(x), q16(lin.weight), q16(lin.bias))))
    assert repr(mode) == ("EmulatedPrecision('fp16', round_outputs=True, round_grads=False, "
                          "propagate=False)")


def test_propagate_defaults_to_round_outputs_and_needs_it():
    assert EmulatedPrecision("fp16", round_outputs=True).propagate
    assert not EmulatedPrecision("fp16").propagate
    with pytest.raises(UsageError, match="round_outputs"):
        EmulatedPrecision("fp16", propagate=True)
    a = randn(4, 4)
    with EmulatedPrecision("fp16") as mode:  # no round_outputs: nothing is marked
        y = a @ a
        assert torch.isfinite(y * 1e6).all() and not mode.is_marked(y)


def test_unmarked_fp32_operand_promotes_to_fp32():
    a, b = randn(8, 8, seed=1), randn(8, 8, seed=2)
    other = torch.full((8, 8), 1.0 + 2**-20)  # unrepresentable in fp16
    big = torch.full((8, 8), 1e6)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ b
        summed = y + other
        product = y * big
        scaled = y * 3.3  # a Python scalar does not count: fp16
        zero_dim = y * torch.tensor(3.3)  # a 0-dim fp32 tensor neither (torch's promotion)
    assert mode.is_marked(y) and not mode.is_marked(summed) and not mode.is_marked(product)
    assert_bitwise(summed, y + other)  # fp16 + fp32 -> fp32: not rounded
    assert not torch.equal(summed, q16(summed))
    assert torch.isfinite(product).all()  # computed in fp32: no overflow
    assert mode.is_marked(scaled) and mode.is_marked(zero_dim)
    assert_bitwise(scaled, q16(y * 3.3))
    assert_bitwise(zero_dim, q16(y * torch.tensor(3.3)))


def test_chains_of_marked_ops_are_rounded_at_each_step():
    a = randn(8, 8, seed=3)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ a
        z = F.gelu(y) * 1.001 + y / 3
    ref_y = q16(q16(a) @ q16(a))
    expected = q16(q16(q16(F.gelu(ref_y)) * 1.001) + q16(ref_y / 3))
    assert_bitwise(z, expected)
    assert mode.is_marked(z)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "layer_norm", "group_norm", "cross_entropy",
                                "mse_loss", "exp", "sum", "cumsum", "norm"])
def test_autocast_fp32_ops_give_unmarked_unrounded_outputs(op):
    a = randn(4, 8, seed=4)
    target = torch.zeros(4, dtype=torch.long)
    run = {
        "softmax": lambda t: F.softmax(t, -1),
        "log_softmax": lambda t: t.log_softmax(-1),
        "layer_norm": lambda t: F.layer_norm(t, (8,)),
        "group_norm": lambda t: F.group_norm(t, 2),
        "cross_entropy": lambda t: F.cross_entropy(t, target),
        "mse_loss": lambda t: F.mse_loss(t, t * 0.5),
        "exp": lambda t: t.exp(),
        "sum": lambda t: t.sum(-1),
        "cumsum": lambda t: torch.cumsum(t, 0),
        "norm": lambda t: t.norm(dim=-1),
    }[op]
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ torch.eye(8)
        out = run(y)
    assert mode.is_marked(y)
    assert not mode.is_marked(out)
    assert_bitwise(out, run(q16(a)))  # in fp32, from the fp16 values: not rounded
    assert not torch.equal(out, q16(out))


def test_softmax_and_layer_norm_of_a_marked_tensor_are_unmarked():
    a = randn(4, 8, seed=5)
    ln = nn.LayerNorm(4)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ a.t()
        s, n1, n2 = y.softmax(-1), ln(y), F.layer_norm(y, (4,))
        # downstream of them everything is fp32 again: no overflow from the product
        big = s * 1e9
    assert mode.is_marked(y)
    assert not any(mode.is_marked(t) for t in (s, n1, n2, big))
    assert torch.isfinite(big).all()
    assert "softmax" in " ".join(AUTOCAST_FP32_OPS) and "torch.nn.functional.layer_norm" in AUTOCAST_FP32_OPS


def test_explicit_casts_and_dtype_arguments_unmark():
    a = randn(4, 8, seed=6)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ torch.eye(8)
        as_float = y.float()
        as_to = y.to(torch.float32)
        on_device = y.to("cpu")
        with_dtype = y.mean(-1, dtype=torch.float32)  # mean is not on the fp32 list
        without = y.mean(-1)
        amplified = as_float * 1e6
    assert as_float is not y and not mode.is_marked(as_float) and not mode.is_marked(as_to)
    assert as_float.data_ptr() == y.data_ptr()  # an alias, no copy
    assert on_device is y and mode.is_marked(on_device)  # no dtype asked: stays fp16
    assert not mode.is_marked(with_dtype) and mode.is_marked(without)
    assert torch.isfinite(amplified).all() and not mode.is_marked(amplified)


def test_views_and_value_preserving_ops_stay_marked_without_copies():
    a = randn(4, 6, seed=7)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ torch.eye(6)
        views = [y.view(24), y.t(), y[1:], y.transpose(0, 1), y.T, *y.split(3, dim=1), y.detach()]
        copies = [y.clone(), y.t().contiguous(), torch.cat([y, y]), y.abs(), F.relu(y), y.amax(-1),
                  y.max(dim=-1).values]
    assert all(mode.is_marked(t) for t in views + copies)
    storage = y.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in views)  # no copies


def test_in_place_ops_on_marked_tensors_are_rounded():
    a = randn(4, 8, seed=8)
    fp32 = torch.full((4, 8), 1.0 + 2**-20)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = a @ torch.eye(8)
        ref = y.clone()
        y.mul_(2e5)
        z = ref.clone()
        z += fp32  # fp16 += fp32 stays fp16 (in place keeps the dtype)
        w = ref.clone()
        w[0] = 1e6
        plain = fp32.clone()
        plain.mul_(ref)  # an unmarked tensor stays fp32
    assert mode.is_marked(y) and torch.isinf(y).any()
    assert torch.equal(torch.isinf(y), torch.isinf(q16(ref * 2e5)))
    assert_bitwise(z, q16(ref + fp32))
    assert torch.isinf(w[0]).all()
    assert_bitwise(plain, fp32 * ref) and not mode.is_marked(plain)


def test_marks_are_identity_based_and_weak():
    a = randn(4, 4, seed=9)
    mode = EmulatedPrecision("fp16", round_outputs=True)
    with mode:
        y = a @ a
    twin = y.clone()  # equal values, another tensor
    assert mode.is_marked(y) and not mode.is_marked(twin) and not mode.is_marked(a)
    assert isinstance(mode._marks, weakref.WeakValueDictionary)
    n = len(mode._marks)
    del y
    gc.collect()
    assert len(mode._marks) == n - 1
    with mode:  # marks outlive the block, as an fp16 tensor stays fp16
        z = a @ a
    with mode:
        assert mode.is_marked(z * 2)


def test_propagated_rounding_is_differentiable():
    x = torch.ones(2, 4, requires_grad=True)
    w = torch.eye(4, requires_grad=True)
    c = 1.0 + 2**-12  # not representable in fp16
    for round_grads, expected in ((False, c * c), (True, 1.0)):
        x.grad = None
        with EmulatedPrecision("fp16", round_outputs=True, round_grads=round_grads) as mode:
            y = F.linear(x, w)
            z = y * c  # marked: rounded (differentiably)
            assert mode.is_marked(z) and z.requires_grad
            (z * c).sum().backward()  # z * c is rounded too; its grad is c
        # straight through: d/dx = c * c; with round_grads each step rounds: q(c) == 1
        torch.testing.assert_close(x.grad, torch.full((2, 4), expected), rtol=0, atol=0)


def test_in_place_rounding_keeps_the_graph():
    x = torch.ones(2, 4, requires_grad=True)
    with EmulatedPrecision("fp16", round_outputs=True) as mode:
        y = F.linear(x, torch.eye(4))
        y.mul_(3.0)
        assert mode.is_marked(y)
        y.sum().backward()
    assert torch.equal(x.grad, torch.full((2, 4), 3.0))


@pytest.mark.parametrize("round_grads", [False, True])
def test_in_place_ops_that_save_their_result_still_backpropagate(round_grads):
    # sigmoid_ and relu_ save their result for backward: rounding it in place must not trip
    # autograd's modified-in-place check, and backward must see the rounded result.
    x = randn(4, 8, seed=10).requires_grad_()
    c = 1.0 + 2**-12
    with EmulatedPrecision("fp16", round_outputs=True, round_grads=round_grads) as mode:
        y = F.linear(x, torch.eye(8))
        s = y.sigmoid_()
        r = (s - 0.5).relu_()
        (r * c).sum().backward()
    assert s is y and mode.is_marked(s) and mode.is_marked(r)
    assert_bitwise(s.detach(), q16(torch.sigmoid(q16(x.detach()))))
    sd = s.detach()
    g = (sd > 0.5).float() * (c if not round_grads else 1.0)
    g = g if not round_grads else q16(g)
    expected = g * sd * (1 - sd)
    expected = q16(expected) if round_grads else expected
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_propagation_in_a_real_model_matches_native_dtypes():
    # Which outputs native autocast keeps in fp16 is which outputs the emulation marks.
    from mixprec.recipes.lm import lm

    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=16, batch_size=2)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.train_batches(0))
    names = ["blocks.0.attn.qkv", "blocks.0.attn", "blocks.0.mlp.gelu", "blocks.0.mlp", "blocks.0.ln1",
             "blocks.0", "ln_f", "lm_head"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.float16):
                model(batch[0])
            native = {n: t.dtype == torch.float16 for n, t in seen.items()}
            with EmulatedPrecision("fp16", round_outputs=True) as mode:
                model(batch[0])
                emulated = {n: mode.is_marked(t) for n, t in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    assert native["blocks.0.mlp.gelu"] and native["lm_head"] and not native["blocks.0"]
    # layer norms: fp16 under CPU autocast, fp32 under CUDA's (what emulation follows)
    assert ({n: v for n, v in native.items() if "ln" not in n}
            == {n: v for n, v in emulated.items() if "ln" not in n})
    assert not emulated["blocks.0.ln1"] and not emulated["ln_f"]


# --------------------------------------------------------------------------- gradients


def _identity_linear_grad(round_grads: bool, round_outputs: bool = False):
    x = torch.ones(2, 4, requires_grad=True)
    w = torch.eye(4, requires_grad=True)
    c = 1.0 + 2**-12  # upstream gradient, not representable in fp16
    with EmulatedPrecision("fp16", round_grads=round_grads, round_outputs=round_outputs):
        y = F.linear(x, w)
        (y * c).sum().backward()
    return x.grad, w.grad, c


def test_round_grads_rounds_gradient_into_inputs():
    gx, gw, c = _identity_linear_grad(round_grads=True)
    assert torch.equal(gx, torch.ones(2, 4))  # q16(1 + 2**-12) == 1
    assert torch.equal(gw, torch.full((4, 4), 2.0))  # q16(2 * c) == 2
    assert q16(torch.tensor([c])).item() == 1.0


def test_without_round_grads_gradient_is_straight_through():
    gx, gw, c = _identity_linear_grad(round_grads=False)
    assert torch.equal(gx, torch.full((2, 4), c))
    assert torch.equal(gw, torch.full((4, 4), 2 * c))


def test_round_grads_with_round_outputs():
    gx, _, _ = _identity_linear_grad(round_grads=True, round_outputs=True)
    assert torch.equal(gx, torch.ones(2, 4))


def test_gradient_reaches_fp32_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = randn(5, 4)
    with EmulatedPrecision("fp16"):
        lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    # d/dW sum(W q(x)) = column sums of q(x), straight through the weight rounding
    assert torch.equal(lin.weight.grad, q16(x).sum(0).expand(3, 4))


# --------------------------------------------------------------------------- the op list


def _cases():
    a, b = randn(6, 5, seed=1), randn(5, 7, seed=2)
    ba, bb = randn(3, 6, 5, seed=3), randn(3, 5, 7, seed=4)
    bias, bbias = randn(6, 7, seed=5), randn(3, 6, 7, seed=6)
    img, ker, kb = randn(2, 3, 9, 9, seed=7), randn(4, 3, 3, 3, seed=8), randn(4, seed=9)
    sig, k1 = randn(2, 3, 11, seed=10), randn(4, 3, 3, seed=11)
    vol, k3 = randn(1, 2, 5, 5, 5, seed=12), randn(3, 2, 2, 2, 2, seed=13)
    qh, kh, vh = (randn(2, 2, 5, 8, seed=s) for s in (14, 15, 16))
    return [
        ("torch.Tensor.matmul", lambda: a @ b, lambda: q16(a) @ q16(b)),
        ("torch.matmul", lambda: torch.matmul(ba, bb), lambda: torch.matmul(q16(ba), q16(bb))),
        ("torch.Tensor.matmul", lambda: a.matmul(b), lambda: q16(a).matmul(q16(b))),
        ("torch.mm", lambda: torch.mm(a, b), lambda: torch.mm(q16(a), q16(b))),
        ("torch.bmm", lambda: torch.bmm(ba, bb), lambda: torch.bmm(q16(ba), q16(bb))),
        ("torch.Tensor.bmm", lambda: ba.bmm(bb), lambda: q16(ba).bmm(q16(bb))),
        ("torch.addmm", lambda: torch.addmm(bias, a, b),
         lambda: torch.addmm(q16(bias), q16(a), q16(b))),
        ("torch.baddbmm", lambda: torch.baddbmm(bbias, ba, bb, alpha=0.5),
         lambda: torch.baddbmm(q16(bbias), q16(ba), q16(bb), alpha=0.5)),
        ("torch.einsum", lambda: torch.einsum("bij,bjk->bik", ba, bb),
         lambda: torch.einsum("bij,bjk->bik", q16(ba), q16(bb))),
        ("torch.einsum", lambda: torch.einsum("ij,jk->ik", [a, b]),
         lambda: torch.einsum("ij,jk->ik", [q16(a), q16(b)])),
        ("torch.nn.functional.conv2d", lambda: F.conv2d(img, ker, kb, padding=1),
         lambda: F.conv2d(q16(img), q16(ker), q16(kb), padding=1)),
        ("torch.nn.functional.conv1d", lambda: F.conv1d(sig, k1),
         lambda: F.conv1d(q16(sig), q16(k1))),
        ("torch.nn.functional.conv3d", lambda: F.conv3d(vol, k3),
         lambda: F.conv3d(q16(vol), q16(k3))),
        ("torch.nn.functional.scaled_dot_product_attention",
         lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True),
         lambda: F.scaled_dot_product_attention(q16(qh), q16(kh), q16(vh), is_causal=True)),
        ("torch.nn.functional.scaled_dot_product_attention",
         lambda: F.scaled_dot_product_attention(query=qh, key=kh, value=vh),
         lambda: F.scaled_dot_product_attention(q16(qh), q16(kh), q16(vh))),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_listed_ops_are_intercepted(case):
    name, run, reference = _cases()[case]
    with EmulatedPrecision("fp16") as mode:
        out = run()
    expected = reference()
    assert_bitwise(out, expected)
    assert not torch.equal(out, run())  # the plain fp32 result differs
    assert mode.intercepted == {name: 1}
    assert name in emulated_matmul_ops()


def test_sdpa_float_mask_is_not_rounded():
    qh, kh, vh = (randn(1, 1, 4, 8, seed=s) for s in (1, 2, 3))
    mask = randn(4, 4, seed=4) * 0.5  # an additive bias (ALiBi-like), not matmul data
    mask[:, 2] = -1e9  # fp8_e4m3 would saturate this to -448
    with EmulatedPrecision("fp8_e4m3"):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        positional = F.scaled_dot_product_attention(qh, kh, vh, mask)
    q8 = lambda t: quantize(t, "fp8_e4m3")  # noqa: E731
    expected = F.scaled_dot_product_attention(q8(qh), q8(kh), q8(vh), attn_mask=mask)
    assert_bitwise(out, expected)
    assert_bitwise(positional, expected)
    rounded_mask = F.scaled_dot_product_attention(q8(qh), q8(kh), q8(vh), attn_mask=q8(mask))
    assert not torch.equal(out, rounded_mask)  # the test would see a rounded mask


def test_emulated_matmul_ops_lists_the_required_ops():
    required = {
        "torch.nn.functional.linear", "torch.matmul", "torch.Tensor.matmul",
        "torch.Tensor.__matmul__", "torch.mm", "torch.bmm", "torch.addmm", "torch.baddbmm",
        "torch.nn.functional.conv1d", "torch.nn.functional.conv2d",
        "torch.nn.functional.conv3d", "torch.nn.functional.scaled_dot_product_attention",
        "torch.einsum",
    }
    ops = emulated_matmul_ops()
    assert required <= set(ops)
    assert list(ops) == sorted(set(ops))


# --------------------------------------------------------------------------- modules


def test_conv2d_module():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = randn(2, 3, 8, 8)
    with EmulatedPrecision("bf16") as mode:
        y = conv(x)
    qb = lambda t: quantize(t, "bf16")  # noqa: E731
    assert_bitwise(y, F.conv2d(qb(x), qb(conv.weight), qb(conv.bias), padding=1).detach())
    assert mode.intercepted == {"torch.nn.functional.conv2d": 1}


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_internals_are_emulated(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = randn(2, 5, 16)
    plain = mha(x, x, x, need_weights=need_weights)[0]
    with EmulatedPrecision("fp32") as ident:  # identity rounding: same numbers as plain
        same = mha(x, x, x, need_weights=need_weights)[0]
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)
    with EmulatedPrecision("fp8_e4m3") as mode:
        emulated = mha(x, x, x, need_weights=need_weights)[0]
    assert not torch.allclose(emulated, plain, atol=1e-4)
    attention = {"torch.bmm": 2} if need_weights else {
        "torch.nn.functional.scaled_dot_product_attention": 1}
    assert mode.intercepted == {"torch.nn.functional.linear": 2, **attention}
    assert ident.intercepted == mode.intercepted


def test_real_model_training_step_goes_through_the_mode():
    from mixprec.recipes.lm import lm

    task = lm(n_layer=1, d_model=32, n_head=2, seq_len=16, batch_size=2)
    torch.manual_seed(0)
    model = task.build_model()
    opt = task.build_optimizer(model)
    batch = next(task.train_batches(0))
    ref = task.loss(model, batch)
    with EmulatedPrecision("fp16", round_outputs=True, round_grads=True) as mode:
        loss = task.loss(model, batch)
        loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.item() != ref.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # qkv, attn.proj, mlp.fc, mlp.proj, lm_head; one causal SDPA
    assert mode.intercepted == {"torch.nn.functional.linear": 5,
                                "torch.nn.functional.scaled_dot_product_attention": 1}
    # fp16 rounding of every matmul output: the logits' grads are fp16 values
    head_grad = model.lm_head.weight.grad
    assert torch.equal(head_grad, q16(head_grad))


# --------------------------------------------------------------------------- fp8


def test_fp8_e4m3_emulation_quantizes_to_e4m3_values():
    x = randn(4, 8, scale=50)
    x[0, 0], x[0, 1] = 1000.0, -3000.0  # beyond 448: the e4m3 cast saturates
    eye = torch.eye(8)
    with EmulatedPrecision("fp8_e4m3") as mode:
        y = x @ eye  # exact in fp32, so y shows the rounded input
        lin = F.linear(x, randn(3, 8, seed=5))
    q8 = quantize(x, "fp8_e4m3")
    assert_bitwise(y, q8)
    assert y[0, 0].item() == 448.0 and y[0, 1].item() == -448.0
    assert_bitwise(quantize(y, "fp8_e4m3"), y)
    assert not torch.equal(y, x)
    assert_bitwise(lin, F.linear(q8, quantize(randn(3, 8, seed=5), "fp8_e4m3")))
    with EmulatedPrecision("fp8_e4m3", round_outputs=True):
        out = F.linear(x, randn(3, 8, seed=5))
    assert_bitwise(quantize(out, "fp8_e4m3"), out)
    assert mode.intercepted["torch.Tensor.matmul"] == 1


# --------------------------------------------------------------------------- API


def test_unknown_format_is_usage_error():
    with pytest.raises(UsageError, match="fp17"):
        EmulatedPrecision("fp17")


def test_options_are_keyword_only_and_repr():
    with pytest.raises(TypeError):
        EmulatedPrecision("fp16", True)  # type: ignore[misc]
    mode = EmulatedPrecision("half", round_outputs=True)
    assert mode.format.name == "fp16"
    assert repr(mode) == "EmulatedPrecision('fp16', round_outputs=True, round_grads=False)"


def test_mode_can_be_reentered_and_counts_accumulate():
    mode = EmulatedPrecision("fp16")
    a = randn(3, 3)
    for _ in range(2):
        with mode:
            torch.mm(a, a)
    assert mode.intercepted["torch.mm"] == 2
    assert_bitwise(torch.mm(a, a), torch.mm(a, a))


def test_out_argument_is_written_not_rounded():
    a, b = randn(4, 4, seed=1), randn(4, 4, seed=2)
    out = torch.empty(4, 4)
    with EmulatedPrecision("fp16", round_outputs=True):
        r = torch.mm(a, b, out=out)
    assert r is out
    assert_bitwise(out, torch.mm(q16(a), q16(b)))


def test_integer_and_bool_inputs_pass_through():
    idx = torch.arange(6).view(2, 3)
    with EmulatedPrecision("fp8_e5m2") as mode:
        r = idx @ idx.t()
    assert torch.equal(r, idx @ idx.t()) and r.dtype == torch.int64
    assert mode.intercepted["torch.Tensor.matmul"] == 1


def test_inf_survives_emulation():
    a = torch.tensor([[math.inf, 1.0]])
    with EmulatedPrecision("fp16"):
        r = a @ torch.ones(2, 1)
    assert r.item() == math.inf
