"""Optimizer and schedule: decay groups as open_clip_train has them, fused AdamW against float64 AdamW math."""

import math

import pytest
import torch

from clipkit.models import create_model
from clipkit.train.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("clipkit-tiny")[0]


def test_no_decay_on_gains_biases_and_logit_scale(tiny):
    no_decay, decay = param_groups(tiny, 0.2)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.2)
    names = {id(p): n for n, p in tiny.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in undecayed and not undecayed & decayed
    assert undecayed | decayed == set(names.values())
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("ln_final.weight") for n in undecayed) and any(n.endswith(".bias") for n in undecayed)
    assert any(n.endswith("attn.in_proj_weight") for n in decayed) and "text_projection" in decayed


def adamw_float64(params, grads_per_step, lr, wd, betas, eps):
    """AdamW (decoupled decay, bias-corrected moments) written out in float64."""
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            p.mul_(1 - lr * wd[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat = m[i] / (1 - betas[0] ** t)
            v_hat = v[i] / (1 - betas[1] ** t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return params


def test_fused_adamw_matches_float64_reference(tiny):
    opt = build_optimizer(tiny, lr=1e-3, wd=0.2, betas=(0.9, 0.98), eps=1e-6)
    assert opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    wd = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    grads_per_step = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(3)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    want = adamw_float64(start, grads_per_step, 1e-3, wd, (0.9, 0.98), 1e-6)
    worst = max(float((p.detach().double() - w).abs().max()) for p, w in zip(params, want))
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(params, start))
    assert worst < 1e-6 < moved, (worst, moved)  # 3 steps of 1e-3 moved the weights ~3e-3


def test_warmup_cosine_schedule():
    fn = warmup_cosine(warmup=4, total=20)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert fn(20) == pytest.approx(0.0) and fn(25) == pytest.approx(0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, 4, 20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1 * fn(4), 0.1 * fn(5)])
