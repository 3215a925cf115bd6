"""MomentumModel: the EMA update against float64 written out, not trained, exact state_dict round trip, M = 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipkit.train.momentum import MomentumModel


class _TwoTowers(nn.Module):
    """The interface MomentumModel needs (open_clip's CLIP has it): encode_image / encode_text(normalize=...)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6)).to(dtype)
        self.token_embedding = nn.Embedding(20, 6).to(dtype)
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=dtype))

    def encode_image(self, images, normalize=False):
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts, normalize=False):
        x = self.token_embedding(texts).mean(1)
        return F.normalize(x, dim=-1) if normalize else x


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_ema_update_is_the_written_out_formula_over_every_parameter():
    online = _TwoTowers()
    momentum = MomentumModel(online, 0.9, dtype=None)
    expected = {k: v.detach().clone() for k, v in online.named_parameters()}
    for step in range(3):
        _perturb(online, step)
        online.visual[2].running_mean.fill_(step + 0.5)
        momentum.update(online)
        for name, q in online.named_parameters():
            expected[name] = 0.9 * expected[name] + (1 - 0.9) * q.detach()
    ema = dict(momentum.model.named_parameters())
    assert ema.keys() == expected.keys() and len(ema) == 6  # both towers and the logit scale
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(momentum.model.visual[2].running_mean, online.visual[2].running_mean)  # buffers copied


def test_momentum_model_is_not_trained_decayed_or_shared():
    online = _TwoTowers(torch.float32)
    momentum = MomentumModel(online, 0.995)
    before = {k: v.clone() for k, v in momentum.state_dict().items()}
    assert all(not p.requires_grad for p in momentum.model.parameters())
    assert not any(p is q for p in momentum.model.parameters() for q in online.parameters())
    optimizer = torch.optim.AdamW(online.parameters(), lr=0.1, weight_decay=0.5)
    images, texts = torch.randn(4, 3, 2, 2), torch.randint(0, 20, (4, 5))
    loss = online.encode_image(images).sum() + online.encode_text(texts).sum()
    loss.backward()
    optimizer.step()
    for name, value in momentum.state_dict().items():
        assert torch.equal(value, before[name]), name  # the step (with weight decay) did not touch the copy
    image_keys, text_keys = momentum.keys(images, texts, torch.zeros(4, 6), torch.zeros(4, 6))
    assert not image_keys.requires_grad and image_keys.shape == (4, 6)
    torch.testing.assert_close(image_keys.norm(dim=-1), torch.ones(4))
    momentum.model.eval()
    expected = F.normalize(momentum.model.visual(images), dim=-1)
    torch.testing.assert_close(momentum.keys(images, texts, image_keys, text_keys)[0], expected)


def test_state_dict_round_trip_is_exact():
    online = _TwoTowers(torch.float32)
    momentum = MomentumModel(online, 0.99)
    _perturb(online, 7)
    momentum.update(online)
    resumed = MomentumModel(_TwoTowers(torch.float32), 0.99)
    resumed.load_state_dict({k: v.clone() for k, v in momentum.state_dict().items()})
    for seed in (8, 9):  # two more steps of the same online model for both
        _perturb(online, seed)
        for m in (momentum, resumed):
            m.update(online)
    for (name, a), (_, b) in zip(momentum.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_momentum_zero_uses_the_online_features_detached():
    online = _TwoTowers(torch.float32)
    momentum = MomentumModel(online, 0.0)
    assert momentum.model is None and momentum.state_dict() == {}
    momentum.update(online)  # a no-op
    image_features = torch.randn(3, 6, requires_grad=True)
    text_features = torch.randn(3, 6, requires_grad=True)
    image_keys, text_keys = momentum.keys(None, None, image_features, text_features)
    assert torch.equal(image_keys, image_features) and not image_keys.requires_grad
    assert torch.equal(text_keys, text_features) and not text_keys.requires_grad
    with pytest.raises(ValueError, match="momentum 0 keeps no EMA weights"):
        momentum.load_state_dict({"w": torch.zeros(1)})


def test_bad_momentum_values_are_refused():
    for value in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
            MomentumModel(_TwoTowers(), value)
    with pytest.raises(ValueError, match="no momentum weights"):
        MomentumModel(_TwoTowers(), 0.5).load_state_dict({})
