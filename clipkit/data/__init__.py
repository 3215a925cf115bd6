"""Training data: WebDataset shards -> deterministic, exactly resumable batches (see `wds`)."""

from .urls import count_samples, expand_urls, shard_sizes
from .wds import (
    GOOD_REASONS,
    REASONS,
    DataPosition,
    LoaderStalled,
    SampleExtras,
    TrainLoader,
    build_train_loader,
    default_stall_samples,
    epoch_pieces,
    epoch_shard_order,
)

__all__ = [
    "GOOD_REASONS", "REASONS", "DataPosition", "LoaderStalled", "SampleExtras", "TrainLoader", "build_train_loader",
    "count_samples", "default_stall_samples", "epoch_pieces", "epoch_shard_order", "expand_urls", "shard_sizes",
]
