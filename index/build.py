"""FAISS indexes (image and text) over the embeddings `index/embed.py` wrote, plus the explorer's 2-D map.

    python index/build.py emb/ --max-index-memory 4G              # auto: exact, HNSW or IVF-PQ within the budget
    python index/build.py emb/ --kind ivfpq --max-index-memory 512M

Prints each index's kind, size, build time and recall@10 against exact search on held-out queries; writes
`image.index`, `text.index`, `index.json` (the manifest the service checks) and `map.npy` into the directory.
"""

from clipkit.eval.cli import run_main
from clipkit.index.cli import build_main

if __name__ == "__main__":
    run_main(build_main)
