"""The embeddings service (`serve/app.py`): OpenAI-compatible embeddings, clip-retrieval-compatible search, images."""
