"""fp8-mixed through torchao's float8 training (runs on CPU via torch._scaled_mm, slowly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixprec
from mixprec.recipes.lm import lm

pytest.importorskip("torchao")

TINY = dict(n_layer=1, d_model=64, n_head=2, seq_len=64, batch_size=8)


def test_fp8_mixed_trains_the_lm_recipe_with_falling_loss():
    result = mixprec.train(lm(**TINY), "fp8-mixed", steps=25)
    assert result["status"] == "completed" and not result["skipped_steps"]
    assert sum(result["losses"][-5:]) / 5 < 0.8 * result["losses"][0]
    policy = result["policy"]
    assert policy["mode"] == "fp8-mixed" and policy["loss_scaling"] is False
    assert set(policy["fp8_modules"]) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc",
                                          "blocks.0.mlp.proj", "lm_head"}
    assert policy["modules"]["lm_head"] == "fp8_e4m3"
    assert policy["modules"]["blocks.0.ln1"] == "autocast:bf16"


def test_fp8_layers_really_are_float8_and_rules_keep_fp32():
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.Linear(48, 10))
    engine = mixprec.Engine(mixprec.Policy("fp8-mixed", rules=[mixprec.Rule(match="2")]))
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(model[0], Float8Linear)
    assert not isinstance(model[2], Float8Linear)  # kept in fp32 by the rule
    assert not isinstance(model[3], Float8Linear)  # 48x10: not a multiple of 16
    policy = engine.effective_policy()
    assert policy["fp8_modules"] == ["0"]
    assert "multiple of 16" in policy["fp8_skipped"]["3"]
    assert policy["modules"] == {"0": "fp8_e4m3", "2": "fp32", "3": "autocast:bf16"}
    with engine.autocast():
        out = model(torch.randn(4, 32))
    engine.backward(out.float().square().mean())
    assert engine.step().stepped


def test_controllers_refuse_fp8():
    with pytest.raises(mixprec.UsageError, match="needs fp16-mixed or bf16-mixed"):
        mixprec.train(lm(**TINY), mixprec.policy_from_options("fp8-mixed", controller="adaptive"), steps=1)
