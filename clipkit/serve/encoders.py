"""The two towers behind the service, on torch or on onnxruntime, with the same interface.

`encode("text", [str, ...])` and `encode("image", [tensor [3, H, W], ...])` return [N, D] float32, L2-normalised:
exactly `F.normalize(model.encode_text(tokenizer(texts)))` / `F.normalize(model.encode_image(stack(images)))`.
Only the batching thread (`clipkit.serve.batching`) calls `encode`.
"""

from pathlib import Path
from typing import Any, Callable, List

import numpy as np
import torch


class TorchEncoder:
    backend = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, fingerprint: str,
                 name: str, dim: int, device: Any = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer, self.preprocess, self.device = tokenizer, preprocess, torch.device(device)
        self.fingerprint, self.name, self.dim = fingerprint, name, dim

    def tokens(self, texts: List[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode(self, kind: str, items: List[Any]) -> np.ndarray:
        import torch.nn.functional as F

        if kind == "text":
            out = self.model.encode_text(self.tokens(items).to(self.device))
        else:
            out = self.model.encode_image(torch.stack(items).to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()


class OnnxEncoder:
    """The encoders exported by `clipkit.serve.onnx_export` (image.onnx, text.onnx; normalisation inside)."""

    backend = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, tokenizer: Callable, preprocess: Callable, fingerprint: str, name: str,
                 dim: int, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        onnx_dir = Path(onnx_dir)
        self.image = ort.InferenceSession(str(onnx_dir / "image.onnx"), opts, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(onnx_dir / "text.onnx"), opts, providers=["CPUExecutionProvider"])
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.fingerprint, self.name, self.dim = fingerprint, name, dim

    def tokens(self, texts: List[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode(self, kind: str, items: List[Any]) -> np.ndarray:
        if kind == "text":
            ids = self.tokens(items).numpy().astype(np.int64)
            return self.text.run(None, {"input_ids": ids})[0].astype(np.float32)
        pixels = torch.stack(items).numpy().astype(np.float32)
        return self.image.run(None, {"pixel_values": pixels})[0].astype(np.float32)
