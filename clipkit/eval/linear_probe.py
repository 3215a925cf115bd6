"""Linear probe: multinomial logistic regression on frozen image features, on CPU.

Features are standardised with the training set's mean and std. The weight decay (L2 on the weights, as sklearn's
C = 1 / (wd * N)) is chosen on a held-out part of the training set, then the probe is refitted on all of it.
Full-batch L-BFGS (torch), so the result does not depend on a learning rate or epoch count, unlike CLIP_benchmark's
SGD probe.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipkit.eval.metrics import classification_metrics

DEFAULT_WD_GRID = tuple(10.0 ** e for e in range(-6, 1))


@dataclass
class LogisticRegression:
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D] standardisation
    std: torch.Tensor  # [D]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
                            max_iter: int = 500) -> LogisticRegression:
    """x: [N, D] float, y: [N] int64. Minimises mean cross-entropy + wd / 2 * ||W||^2 with L-BFGS (float64)."""
    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-8)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * wd * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(weight.detach(), bias.detach(), mean, std)


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
        val_acc[wd] = (probe.scores(train_x[val_idx].double()).argmax(dim=1) == train_y[val_idx]).double().mean().item()
    best = max(wd_grid, key=lambda w: (val_acc[w], w))  # ties go to the stronger regulariser
    probe = fit_logistic_regression(train_x, train_y, num_classes, best, max_iter)
    out = classification_metrics(probe.scores(test_x.double()), test_y)
    out.update(wd=best, val_acc1={f"{w:g}": a for w, a in val_acc.items()})
    return out
