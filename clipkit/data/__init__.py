"""Training data: WebDataset shards -> deterministic, exactly resumable batches (see `wds`)."""

from .urls import count_samples, expand_urls
from .wds import GOOD_REASONS, REASONS, DataPosition, TrainLoader, build_train_loader, epoch_shard_order

__all__ = [
    "GOOD_REASONS", "REASONS", "DataPosition", "TrainLoader", "build_train_loader", "count_samples",
    "epoch_shard_order", "expand_urls",
]
