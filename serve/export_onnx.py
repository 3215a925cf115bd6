"""Both encoders of a model to ONNX, checked against torch (max |diff| <= 1e-4).

    python serve/export_onnx.py --model runs/tiny --output onnx/
    python serve/app.py --index emb/ --model runs/tiny --onnx --onnx-dir onnx/
"""

from clipkit.eval.cli import run_main
from clipkit.serve.cli import export_main

if __name__ == "__main__":
    run_main(export_main)
