"""Linear probe: multinomial logistic regression on frozen image features (scikit-learn, on CPU).

Features are standardised with the training set's mean and std. The weight decay (L2 on the weights: scikit-learn's
C = 1 / (wd * N)) is chosen on a held-out part of the training set, then the probe is refitted on all of it.
scikit-learn's L-BFGS solves the full-batch problem, so the result does not depend on a learning rate or epoch count,
unlike CLIP_benchmark's SGD probe.
"""

from dataclasses import dataclass

import torch

from clipkit.eval.metrics import classification_metrics

DEFAULT_WD_GRID = tuple(10.0 ** e for e in range(-6, 1))


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [D, C] float64
    bias: torch.Tensor  # [C] float64 (-inf for a class absent from the training labels)
    mean: torch.Tensor  # [D] standardisation
    std: torch.Tensor  # [D]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
                            max_iter: int = 500) -> LogisticRegression:
    """x: [N, D] float, y: [N] int64. Minimises mean cross-entropy + wd / 2 * ||W||^2 (scikit-learn's lbfgs,
    float64; the bias is not decayed)."""
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-8)
    z = ((x - mean) / std).numpy()
    labels = y.numpy()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64)
    bias = torch.full((num_classes,), float("-inf"), dtype=torch.float64)
    present = sorted(set(labels.tolist()))
    if len(present) == 1:  # one class only: it always wins
        bias[present[0]] = 0.0
        return LogisticRegression(weight, bias, mean, std)
    fit = SkLogisticRegression(C=1.0 / (wd * len(labels)), max_iter=max_iter, tol=1e-8).fit(z, labels)
    coef, intercept = torch.from_numpy(fit.coef_).double(), torch.from_numpy(fit.intercept_).double()
    classes = [int(c) for c in fit.classes_]
    if len(classes) == 2:  # scikit-learn keeps one row: the log-odds of classes[1] against classes[0]
        weight[:, classes[1]], bias[classes[1]], bias[classes[0]] = coef[0], intercept[0], 0.0
    else:
        weight[:, classes] = coef.T
        bias[classes] = intercept
    return LogisticRegression(weight, bias, mean, std)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, wd_grid=DEFAULT_WD_GRID, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 500, progress: bool = False) -> dict:
    """Chooses wd on a seeded `val_fraction` hold-out of train, refits on all of train, scores test. Returns the
    classification metrics of test plus `wd` (chosen) and `val_acc1` ({wd: hold-out top-1})."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_x), generator=gen)
    n_val = max(1, int(round(len(train_x) * val_fraction)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    val_acc = {}
    from tqdm import tqdm

    for wd in tqdm(wd_grid, desc="wd sweep", disable=not progress, leave=False):
        probe = fit_logistic_regression(train_x[fit_idx], train_y[fit_idx], num_classes, wd, max_iter)
        val_acc[wd] = (probe.scores(train_x[val_idx]).argmax(dim=1) == train_y[val_idx]).double().mean().item()
    best = max(wd_grid, key=lambda w: (val_acc[w], w))  # ties go to the stronger regulariser
    probe = fit_logistic_regression(train_x, train_y, num_classes, best, max_iter)
    out = classification_metrics(probe.scores(test_x), test_y)
    out.update(wd=best, val_acc1={f"{w:g}": a for w, a in val_acc.items()})
    return out
