"""Zero-shot classifier vs open_clip, metrics vs CLIP_benchmark's formulas, evaluate_zeroshot (the loop's entry)."""

import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from clipkit.eval import zeroshot
from clipkit.eval.datasets import build_dataset
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.templates import class_prompts, load_templates
from clipkit.eval.zeroshot import build_zero_shot_classifier, evaluate_zeroshot, run_zeroshot
from clipkit.models import create_model
from tests.eval_helpers import ColorModel, ColorTokenizer, Wrapper, to_tensor, write_color_folder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net, _, _, _, tokenizer = create_model("clipkit-tiny")
    return net.eval(), tokenizer


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_classifier_matches_open_clip(tiny, dtype, tol):
    net, tokenizer = tiny
    net = net.to(dtype)
    names = [f"thing number {i}" for i in range(8)]
    try:
        for fns in (OPENAI_IMAGENET_TEMPLATES[:10], SIMPLE_IMAGENET_TEMPLATES):
            ref = open_clip.build_zero_shot_classifier(net, tokenizer, names, fns, num_classes_per_batch=5)
            ours = build_zero_shot_classifier(net, tokenizer, names, [f("{c}") for f in fns], batch_size=64)
            assert ours.shape == ref.shape == (128, 8)
            assert ours.dtype == dtype
            assert (ours - ref).abs().max().item() < tol
    finally:
        net.float()


def test_named_template_sets_come_from_open_clip():
    openai = load_templates("openai")
    assert len(openai) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert openai == [f("{c}") for f in OPENAI_IMAGENET_TEMPLATES]
    assert class_prompts(load_templates("simple"), ["dog"])[0] == [f("dog") for f in SIMPLE_IMAGENET_TEMPLATES]


def test_per_class_prompts_cupl(tiny):
    net, tokenizer = tiny
    prompts = {"cat": ["a cat", "a small cat with fur"], "dog": ["a dog"], "fish": ["a fish", "fish", "a fish swims"]}
    ours = build_zero_shot_classifier(net, tokenizer, ["cat", "dog", "fish"], prompts, batch_size=2)
    for j, c in enumerate(["cat", "dog", "fish"]):
        with torch.no_grad():
            emb = torch.nn.functional.normalize(net.encode_text(tokenizer(prompts[c])), dim=-1).mean(0)
        assert torch.allclose(ours[:, j], emb / emb.norm(), atol=1e-6)


def test_metrics_match_clip_benchmark_math():
    """classification_metrics (scikit-learn) against CLIP_benchmark's own formulas written out: torch.topk hits for
    acc@k, a bincount confusion matrix, and the mean over present classes of the diagonal / row sum."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 7, generator=gen)
    labels = torch.randint(0, 6, (300,), generator=gen)  # class 6 never occurs: excluded from per-class recall
    scores[labels == 2, 2] += 2.0  # some signal
    m = classification_metrics(scores, labels)
    hits = scores.topk(5, dim=1).indices.eq(labels.view(-1, 1))
    assert m["acc1"] == pytest.approx(hits[:, :1].any(1).double().mean().item(), abs=1e-12)
    assert m["acc5"] == pytest.approx(hits.any(1).double().mean().item(), abs=1e-12)
    cm = torch.bincount(labels * 7 + scores.argmax(1), minlength=49).reshape(7, 7)
    assert torch.equal(m["confusion"], cm)
    present = cm.sum(1) > 0
    recall = (cm.diag()[present].double() / cm.sum(1)[present].double()).mean().item()
    assert m["mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    assert m["n"] == 300
    assert "acc5" not in classification_metrics(scores[:, :4], labels.clamp(max=3))


def test_zero_shot_known_answer(tmp_path):
    ds = build_dataset(f"folder:{write_color_folder(tmp_path / 'colors')}")
    assert ds.classnames == ["blue", "green", "red"]
    m = run_zeroshot(ColorModel(), ColorTokenizer(), to_tensor, ds, "simple", batch_size=5, progress=False)
    # 13 images: one blue image filed under red is the only error.
    assert m["n"] == 13
    assert m["acc1"] == pytest.approx(12 / 13)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 4 / 5) / 3)
    assert m["confusion"].tolist() == [[4, 0, 0], [0, 4, 0], [1, 0, 4]]
    assert m["rejected"] == {}


def test_evaluate_zeroshot_caches_and_restores_mode(tmp_path, monkeypatch):
    spec = f"folder:{write_color_folder(tmp_path / 'colors')}"
    model = Wrapper(ColorModel())
    model.train()
    builds, decodes = [], []
    real_build = zeroshot.build_dataset
    monkeypatch.setattr(zeroshot, "build_dataset", lambda *a, **k: builds.append(a) or real_build(*a, **k))

    def preprocess(img):
        decodes.append(1)
        return to_tensor(img)

    first = evaluate_zeroshot(model, ColorTokenizer(), preprocess, spec, templates="simple", batch_size=4)
    n_decodes = len(decodes)
    second = evaluate_zeroshot(model, ColorTokenizer(), preprocess, spec, templates="simple", batch_size=4)
    assert first == second
    assert set(first) == {"acc1", "mean_per_class_recall", "n"}
    assert first["acc1"] == pytest.approx(12 / 13) and first["n"] == 13
    assert len(builds) == 1 and len(decodes) == n_decodes  # second call: no rebuild, no decoding
    assert model.module.training
    capped = evaluate_zeroshot(model, ColorTokenizer(), preprocess, spec, templates="simple", max_samples=4)
    assert capped["n"] == 4
