"""Data-prep stage: caption dumps (URLs or local paths + captions) -> WebDataset shards.

Entry points: `python data_prep/build_shards.py` / `python -m clipkit.data_prep` (cli.py), or `build_shards(config)`.
"""

from clipkit.data_prep.config import ConfigError, ShardConfig
from clipkit.data_prep.readers import DumpError

__all__ = ["ConfigError", "DumpError", "ShardConfig", "build_shards"]


def build_shards(config: ShardConfig, log=None):
    """See clipkit.data_prep.pipeline.build_shards."""
    from clipkit.data_prep.pipeline import build_shards as run

    return run(config, log)
