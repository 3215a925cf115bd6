"""Which model made a set of embeddings: a fingerprint of its weights and configs.

An index is only meaningful for the model that embedded it: a service that encodes queries with another model returns
nonsense with high confidence. So embeddings, indexes and ONNX exports carry this fingerprint (like a checkpoint's),
and the service refuses a mismatch.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict

import torch

from clipkit.models import OPEN_CLIP_CONFIG, preprocess_cfg_of, resolve_model_config

# Scalars that scale logits but never change an embedding; stored 0-dim by open_clip, 1-element while training.
_LOGIT_PARAMS = ("logit_scale", "logit_bias")


def model_config_of(loaded) -> Dict[str, Any]:
    """The open_clip model config of a `clipkit.eval.models.LoadedModel` (export dir or config name)."""
    export = Path(loaded.pretrained)
    if export.is_dir():
        with open(export / OPEN_CLIP_CONFIG, encoding="utf-8") as f:
            return json.load(f)["model_cfg"]
    return resolve_model_config(loaded.name)[1]


def model_fingerprint(loaded) -> str:
    """sha256 (hex) over the model config, the preprocess config and every weight (name, shape, float32 bytes, in key
    order). The same weights give the same fingerprint whether loaded from an export dir or a name + --pretrained."""
    h = hashlib.sha256()
    h.update(json.dumps(model_config_of(loaded), sort_keys=True).encode())
    h.update(json.dumps(preprocess_cfg_of(loaded.model), sort_keys=True, default=str).encode())
    state = loaded.model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        if name in _LOGIT_PARAMS:
            t = t.reshape(())
        if t.is_floating_point():
            t = t.to(torch.float32)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def model_identity(loaded, spec: str) -> Dict[str, Any]:
    """What a manifest records about the model: fingerprint, name, the spec it was loaded from and its weights."""
    return {"fingerprint": model_fingerprint(loaded), "name": loaded.name, "spec": spec,
            "weights": str(loaded.pretrained)}
