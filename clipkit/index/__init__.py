"""Embedding passes over shards, FAISS index builds and the index manifest (`index/embed.py`, `index/build.py`)."""
