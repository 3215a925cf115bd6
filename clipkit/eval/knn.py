"""k-nearest-neighbour classification on frozen, L2-normalised features, as in DINO (Caron et al. 2021, eval_knn.py):
cosine similarity, the k nearest training samples vote for their class with weight exp(similarity / T)."""

import torch

from clipkit.eval.metrics import classification_metrics


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """train_features: [N, D], test_features: [M, D] (L2-normalised), train_labels: [N] int64 -> votes [M, C]."""
    k = min(k, len(train_features))
    votes = []
    for start in range(0, len(test_features), chunk):
        sims = test_features[start:start + chunk] @ train_features.T  # [m, N] cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        v = torch.zeros(len(sims), num_classes, dtype=weights.dtype)
        votes.append(v.scatter_add_(1, train_labels[top_idx], weights))
    return torch.cat(votes)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """acc1, acc5 (>= 5 classes), mean_per_class_recall, n, confusion of the kNN vote."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return classification_metrics(scores, test_labels)
