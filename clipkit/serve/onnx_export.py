"""Both encoders to ONNX (open_clip #186), for serving on onnxruntime.

    image.onnx   pixel_values [B, 3, H, W] float32 -> embeddings [B, D] float32, L2-normalised
    text.onnx    input_ids [B, context_length] int64 -> embeddings [B, D] float32, L2-normalised
    onnx.json    the model's fingerprint, name, dim, opset, and the parity measured against torch at export

Exported with torch's TorchScript-based exporter (dynamic batch axis); parity is checked on random images and real
token sequences right after export, and the export is refused when it is worse than `tolerance`.
"""

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F

ONNX_MANIFEST = "onnx.json"
OPSET = 17


class _ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return F.normalize(self.model.encode_image(pixel_values), dim=-1)


class _TextTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


def image_size_of(model) -> tuple:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def read_onnx_manifest(out_dir: str | Path) -> Dict[str, Any] | None:
    path = Path(out_dir) / ONNX_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def parity(model, tokenizer, out_dir: Path, seed: int = 0) -> Dict[str, float]:
    """Max |onnxruntime - torch| over a batch of random images and of texts of several lengths."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    h, w = image_size_of(model)
    pixels = torch.randn(3, 3, h, w, generator=g)
    tokens = tokenizer(["a photo of a red star", "x", "a much longer caption about " + "many things " * 20])
    image, text = _ImageTower(model).eval(), _TextTower(model).eval()
    with torch.no_grad():
        ref_i, ref_t = image(pixels).numpy(), text(tokens).numpy()
    si = ort.InferenceSession(str(out_dir / "image.onnx"), providers=["CPUExecutionProvider"])
    st = ort.InferenceSession(str(out_dir / "text.onnx"), providers=["CPUExecutionProvider"])
    got_i = si.run(None, {"pixel_values": pixels.numpy()})[0]
    got_t = st.run(None, {"input_ids": tokens.numpy().astype(np.int64)})[0]
    return {"image_max_abs_diff": float(np.abs(got_i - ref_i).max()),
            "text_max_abs_diff": float(np.abs(got_t - ref_t).max())}


def export_onnx(loaded, fingerprint: str, dim: int, out_dir: str | Path, tolerance: float = 1e-4) -> Dict[str, Any]:
    """Exports `loaded` (a clipkit.eval.models.LoadedModel) into out_dir; returns the manifest written."""
    import warnings

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to("cpu").eval()
    h, w = image_size_of(model)
    pixels = torch.zeros(2, 3, h, w)
    tokens = loaded.tokenizer(["a photo", "a photo of a dog"])
    # Not under no_grad: there nn.MultiheadAttention takes its fused fast path (aten::_native_multi_head_attention),
    # which has no ONNX export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_ImageTower(model), (pixels,), str(out_dir / "image.onnx.tmp"), input_names=["pixel_values"],
                          output_names=["embeddings"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}})
        torch.onnx.export(_TextTower(model), (tokens,), str(out_dir / "text.onnx.tmp"), input_names=["input_ids"],
                          output_names=["embeddings"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "embeddings": {0: "batch"}})
    (out_dir / "image.onnx.tmp").replace(out_dir / "image.onnx")
    (out_dir / "text.onnx.tmp").replace(out_dir / "text.onnx")
    diffs = parity(model, loaded.tokenizer, out_dir)
    worst = max(diffs.values())
    if worst > tolerance:
        raise ValueError(f"ONNX export differs from torch by {worst:.2e} > {tolerance:.0e}: not usable "
                         f"({diffs}); serve without --onnx")
    manifest = {"fingerprint": fingerprint, "name": loaded.name, "dim": dim, "opset": OPSET,
                "image_size": [h, w], "context_length": int(tokens.shape[1]), "parity": diffs}
    (out_dir / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
