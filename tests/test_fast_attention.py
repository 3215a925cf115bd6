"""Issue 10: open_clip's self-attention without nn.MultiheadAttention's layout copies (clipkit.fast_attention): the
same outputs and gradients in float64, the same state dict, left alone where it would differ, and a training run's
losses equal with and without it."""

import copy

import open_clip
import pytest
import torch
from torch import nn

from clipkit.fast_attention import PackedSelfAttention, pack_attention
from clipkit.models import create_model
from clipkit.text_padding import enable_short_text, trim_padding
from tests._train import assert_same_losses_without


def _mha_pair(dim=24, heads=3):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():  # open_clip's init leaves in_proj_bias at zero; make every parameter matter
        for p in mha.parameters():
            p.normal_(0, 0.3)
    return mha, PackedSelfAttention(copy.deepcopy(mha))


@pytest.mark.parametrize("mask", ["none", "causal_float", "bool"])
def test_packed_equals_multihead_attention_in_float64(mask):
    mha, packed = _mha_pair()
    x = torch.randn(4, 7, 24, dtype=torch.float64)
    m = None
    if mask == "causal_float":
        m = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu_(1)
    elif mask == "bool":
        m = torch.rand(7, 7) < 0.3
        m.fill_diagonal_(False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = mha(xa, xa, xa, need_weights=False, attn_mask=m)[0]
    yb, none = packed(xb, xb, xb, need_weights=False, attn_mask=m)
    assert none is None
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-12)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-12)
    for (name, pa), (name_b, pb) in zip(mha.named_parameters(), packed.named_parameters()):
        assert name == name_b
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-12, msg=name)


def test_model_features_gradients_and_state_dict_unchanged():
    torch.manual_seed(0)
    ref, _, _, _, tok = create_model("clipkit-tiny")
    ref = ref.double().train()
    enable_short_text(ref, tok)
    net = copy.deepcopy(ref)
    assert pack_attention(net) == 8  # 4 vision + 4 text blocks
    assert sum(isinstance(m, nn.MultiheadAttention) for m in net.modules()) == 0
    assert list(net.state_dict()) == list(ref.state_dict())  # same names, same order
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    (tokens,) = trim_padding(tok(["a red star", "one blue cross on a plain background", "x"]))
    outs = []
    for model in (ref, net):
        out = model(images, tokens)
        (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sin().sum().backward()
        outs.append(out)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=1e-10)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(ref.parameters()))
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-10, msg=n)
    # a packed model's weights load into open_clip's own model strictly (logit_scale: clipkit trains it 1-element)
    plain = open_clip.create_model("clipkit-tiny").double()
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict({k: v.reshape(shapes[k]) for k, v in net.state_dict().items()})


def test_attention_that_would_differ_is_left_alone():
    net, _, _, _, _ = create_model("clipkit-tiny")
    blocks = list(net.visual.transformer.resblocks)
    blocks[0].attn.dropout = 0.1
    blocks[1].attn = nn.MultiheadAttention(192, 4, batch_first=False)
    blocks[2].attn = nn.MultiheadAttention(192, 4, batch_first=True, add_bias_kv=True)
    assert pack_attention(net) == 5
    assert [type(b.attn) for b in blocks] == [nn.MultiheadAttention] * 3 + [PackedSelfAttention]
    _, packed = _mha_pair()
    x, other = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    with torch.no_grad():  # views of the query's memory count as the query (DeepSpeed ZeRO-3 re-wraps inputs)
        torch.testing.assert_close(packed(x, x.view_as(x), x.view_as(x))[0], packed(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="self-attention"):
        packed(x, other, other)
    with pytest.raises(ValueError, match="self-attention"):
        packed(x, need_weights=True)


def test_training_losses_equal_with_and_without_packing(tmp_path):
    assert_same_losses_without(tmp_path, "--no-packed-attention", "self-attention packed in 8 transformer block(s)")
