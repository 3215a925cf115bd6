"""Retrieval recall@k, kNN and the linear probe against brute-force / sklearn references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipkit.eval.knn import knn_classify, knn_scores
from clipkit.eval.linear_probe import fit_logistic_regression, linear_probe
from clipkit.eval.retrieval import retrieval_recall


def brute_force_recall(img, txt, owner, k):
    """CLIP_benchmark's definitions, one query at a time."""
    sims = (txt @ img.T).numpy()
    t2i = np.mean([owner[t] in np.argsort(-sims[t])[:k] for t in range(len(txt))])
    i2t = np.mean([any(owner[j] == i for j in np.argsort(-sims[:, i])[:k]) for i in range(len(img))])
    return t2i, i2t


def test_retrieval_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    owner = torch.tensor([i for i in range(40) for _ in range(1 + i % 3)])  # 1 to 3 captions per image
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 16, generator=gen), dim=-1)
    ks = (1, 5, 10, 100)  # k beyond the number of images is clamped
    got = retrieval_recall(img, txt, owner, ks, chunk=7)
    for k in ks:
        t2i, i2t = brute_force_recall(img, txt, owner.tolist(), k)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert 0 < got["image_retrieval_recall@1"] < 1 and got["image_retrieval_recall@100"] == 1.0


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(200, 8, generator=gen), dim=-1)
    train_y = torch.randint(0, 5, (200,), generator=gen)
    test = F.normalize(torch.randn(30, 8, generator=gen), dim=-1)
    votes = knn_scores(train, train_y, test, 5, k=7, temperature=0.1, chunk=4)
    for i in range(30):
        sims = train @ test[i]
        top = sims.argsort(descending=True)[:7]
        expect = torch.zeros(5)
        for j in top:
            expect[train_y[j]] += torch.exp(sims[j] / 0.1)
        assert torch.allclose(votes[i], expect, rtol=1e-5)
    m = knn_classify(train, train_y, test, votes.argmax(1), 5, k=7, temperature=0.1)
    assert m["acc1"] == 1.0 and m["n"] == 30


def blobs(n, d=6, classes=3, seed=0, spread=1.5):
    """Gaussian blobs around fixed class centres; `seed` draws the samples."""
    centers = np.random.default_rng(1234).normal(size=(classes, d)) * spread
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = centers[y] + rng.normal(size=(n, d))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_logistic_regression_minimises_the_stated_objective():
    """At the fit, the float64 gradient of mean cross-entropy + wd / 2 * ||W||^2 (the bias not decayed) is ~0, and
    nudging the weights in any direction raises the objective: the fit is the objective's minimum."""
    x, y = blobs(300)
    wd = 1e-2
    fit = fit_logistic_regression(x, y, 3, wd, max_iter=1000)
    z = (x.double() - fit.mean) / fit.std
    w, b = fit.weight.clone().requires_grad_(True), fit.bias.clone().requires_grad_(True)

    def objective(w, b):
        return torch.nn.functional.cross_entropy(z @ w + b, y) + 0.5 * wd * w.pow(2).sum()

    objective(w, b).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5
    gen = torch.Generator().manual_seed(0)
    best = objective(fit.weight, fit.bias).item()
    for _ in range(5):
        assert objective(fit.weight + 1e-3 * torch.randn(fit.weight.shape, generator=gen, dtype=torch.float64),
                         fit.bias).item() > best


def test_linear_probe_chooses_wd_on_held_out_part():
    x, y = blobs(400, seed=2, spread=1.0)
    tx, ty = blobs(200, seed=3, spread=1.0)
    m = linear_probe(x, y, tx, ty, 3, wd_grid=(1e-4, 1e-2, 1.0, 100.0))
    assert m["wd"] in (1e-4, 1e-2, 1.0)  # wd = 100 shrinks the weights to ~0: worst on held-out data
    assert m["val_acc1"]["100"] < max(m["val_acc1"].values())
    assert m["wd"] == max((1e-4, 1e-2, 1.0, 100.0), key=lambda w: (m["val_acc1"][f"{w:g}"], w))
    assert m["acc1"] > 0.7 and m["n"] == 200
