"""The embeddings service of one index: OpenAI-compatible embeddings, clip-retrieval-compatible search, images.

    python serve/app.py --index emb/ --model runs/tiny                        # http://127.0.0.1:8000/
    python serve/app.py --index emb/ --model runs/tiny --api-key "$KEY" --port 9000
    python serve/app.py --index emb/ --model runs/tiny --onnx                 # encoders on onnxruntime

API docs at /docs. Binds 127.0.0.1 unless --host says otherwise.
"""

from clipkit.eval.cli import run_main
from clipkit.serve.cli import serve_main

if __name__ == "__main__":
    run_main(serve_main)
