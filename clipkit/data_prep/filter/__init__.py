"""Curating shards with a model and simple rules (DataComp, Gadre et al. 2023): `python data_prep/filter_shards.py`.

Two passes over the input: `score.py` embeds every sample (CLIP score = cosine of image and caption embeddings) into
one scores parquet per shard; `rules.py` decides what is kept over the whole input (so --top-fraction is exact);
`write.py` writes the kept samples' members, byte for byte, into shards in build_shards' layout.
"""

from clipkit.data_prep.filter.config import FilterConfig, FilterError

__all__ = ["FilterConfig", "FilterError", "filter_shards"]


def filter_shards(config: FilterConfig, log=None, loaded=None):
    """See clipkit.data_prep.filter.pipeline.filter_shards."""
    from clipkit.data_prep.filter.pipeline import filter_shards as run

    return run(config, log, loaded)
