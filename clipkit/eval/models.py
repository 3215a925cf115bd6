"""Model SPECs for evaluation.

- a clipkit run directory (holds `final/`) or its `final/` directory: an open_clip export
  (`open_clip_config.json` + `open_clip_model.safetensors`, see `clipkit.models.export_open_clip`), loaded by
  `clipkit.models.load_open_clip` (an HF text tower from the export's own files, wherever the run dir lives);
- `local-dir:DIR`: the same, spelled the way open_clip spells it;
- an open_clip model name (clipkit's configs are registered first, so `clipkit-tiny` works) or a path to an
  open_clip JSON model config, with `pretrained` = a .safetensors file or a torch file (loaded with weights_only=True).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from clipkit.models import OPEN_CLIP_CONFIG


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on `device`
    preprocess: Callable  # PIL image -> [3, H, W] float tensor (open_clip's val transform)
    tokenizer: Callable  # list[str] -> [N, context_length] long tensor
    name: str  # what result JSONs call the model
    pretrained: str  # the weights file or export directory


def _export_dir(spec: str) -> Path | None:
    """The open_clip export directory a SPEC points at, or None when SPEC is not a directory."""
    path = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)
    if not path.is_dir():
        if spec.startswith("local-dir:"):
            raise FileNotFoundError(f"model {spec}: no such directory")
        return None
    if (path / OPEN_CLIP_CONFIG).is_file():
        return path
    if (path / "final" / OPEN_CLIP_CONFIG).is_file():
        return path / "final"
    raise FileNotFoundError(
        f"model {spec}: directory has neither {OPEN_CLIP_CONFIG} nor final/{OPEN_CLIP_CONFIG} "
        "(a run whose training has not finished has no final/ yet)")


def load_model(spec: str, pretrained: str | None = None, device: Any = "cpu") -> LoadedModel:
    """Loads a model SPEC (see module doc) for inference."""
    from clipkit.models import create_model, load_open_clip

    export = _export_dir(spec)
    if export is not None:
        if pretrained:
            raise ValueError(f"model {spec} is an exported directory: it carries its weights, drop --pretrained")
        net, preprocess, tokenizer = load_open_clip(str(export), device)
        run_dir = export.resolve().parent if export.name == "final" else export.resolve()
        return LoadedModel(net, preprocess, tokenizer, run_dir.name, str(export))
    if not pretrained:
        raise ValueError(f"model {spec!r} is a model config name: pass its weights with --pretrained FILE "
                         "(random weights would give chance-level numbers)")
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file")
    net, _, _, preprocess, tokenizer = create_model(spec, pretrained=pretrained)
    return LoadedModel(net.to(device).eval(), preprocess, tokenizer, spec, pretrained)
