"""The data side of a run: the rate the loaders must sustain, the shards the samples fill, and how long data_prep
takes to build them from a dump of URLs.

Shard building is CPU-bound in data_prep (decode, resize, encode: BENCHMARKS.md "Shards"), so its time is
URLs / (nodes x cores x images per core-second), the per-core rate being 1 / (CPU seconds per image) that
bench/shards.py measured; fetching over the internet adds latency that more threads hide, and failed URLs (typically
10-30% of a web dump) cost little CPU. Bytes per sample scale with the pixel count from the measured image size.
"""

from __future__ import annotations

import math
from typing import Dict


def loader_side(samples_per_s: float, gpus: int, gpus_per_node: int) -> Dict[str, float]:
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    return {"samples_per_s_total": samples_per_s, "samples_per_s_per_gpu": samples_per_s / gpus,
            "samples_per_s_per_node": samples_per_s / nodes, "nodes": nodes}


def shard_side(samples: float, image_size: int, calibration: Dict, samples_per_shard: int = 10000) -> Dict:
    shards = calibration.get("shards") or {}
    out: Dict = {"samples_per_shard": samples_per_shard, "shards": math.ceil(samples / samples_per_shard)}
    if shards.get("bytes_per_sample"):
        scale = (image_size / shards["image_size"]) ** 2
        out["bytes_per_sample"] = shards["bytes_per_sample"] * scale
        out["bytes_total"] = out["bytes_per_sample"] * samples
        out["bytes_source"] = (f"measured {shards['bytes_per_sample']:.0f} B/sample at {shards['image_size']} px "
                               f"(bench/shards.py), scaled by pixel count")
    return out


def prep_side(urls: float, nodes: int, cores_per_node: int, calibration: Dict) -> Dict:
    shards = calibration.get("shards")
    if not shards:
        return {"note": "no shards section in the calibration file: run bench/shards.py --calibration FILE"}
    per_core = 1.0 / shards["cpu_s_per_image"]
    rate = per_core * nodes * cores_per_node
    return {"urls": urls, "nodes": nodes, "cores_per_node": cores_per_node, "images_per_s_per_core": per_core,
            "images_per_s": rate, "hours": urls / rate / 3600.0,
            "source": f"measured {1000 * shards['cpu_s_per_image']:.2f} CPU ms per image (bench/shards.py, "
                      f"{shards.get('source', 'local files')})"}
