"""Model construction on top of open_clip, and export back to open_clip's format.

Architectures are open_clip JSON configs (`embed_dim`, `vision_cfg`, `text_cfg`). clipkit's own configs live in
`clipkit/model_configs/` and are registered with `open_clip.add_model_config`, so
`open_clip.create_model("clipkit-tiny")` works once `register_model_configs()` has run.

While training, `logit_scale` (and `logit_bias`) are kept as 1-element tensors: DeepSpeed 0.19 cannot broadcast 0-dim
parameters ("self.dim() cannot be 0 to view Float as Byte"). `export_open_clip` writes them back 0-dim, the shape
open_clip's pretrained checkpoints use.
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Tuple

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json",
    "merges.txt", "vocab.json", "spiece.model",
)

_registered = False


def register_model_configs() -> None:
    """Registers clipkit's JSON model configs with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_models() -> list:
    register_model_configs()
    return open_clip.list_models()


def resolve_model_config(model: str, hf_text_model: str | None = None) -> Tuple[str, Dict[str, Any]]:
    """Returns (name, config dict) for a registered model name or a path to an open_clip-format JSON config.

    `hf_text_model`: a local Hugging Face model directory (e.g. all-MiniLM-L6-v2) that replaces the text tower: the
    config gets `hf_model_name`/`hf_tokenizer_name` pointing there, mean pooling and a linear projection.
    """
    register_model_configs()
    path = Path(model)
    if model.endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {model}")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {model}: malformed JSON at line {e.lineno}, column {e.colno}: "
                             f"{e.msg}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"model config {model}: cannot read it ({e})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"model config {model}: expected a JSON object, got {type(cfg).__name__}")
        name = path.stem
    else:
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            known = ", ".join(m for m in open_clip.list_models() if m.startswith("clipkit")) + ", ViT-B-32, RN50, ..."
            raise ValueError(f"unknown model config {model!r}: use a registered name ({known}) "
                             "or a path to a JSON file")
        name = model
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model config {model!r} lacks {key!r}: not an open_clip model config")
    if hf_text_model:
        hf_dir = Path(hf_text_model)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"--hf-text-model {hf_text_model}: no Hugging Face config.json in that directory")
        hf_dir = str(hf_dir.resolve())
        cfg = dict(cfg)
        cfg["text_cfg"] = {
            "hf_model_name": hf_dir,
            "hf_tokenizer_name": hf_dir,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": cfg["text_cfg"].get("context_length", 77),
        }
        name = f"{name}+{Path(hf_dir).name}"
    return name, cfg


def _register_config(name: str, cfg: Dict[str, Any], config_dir: Path) -> str:
    """Registers `cfg` with open_clip under a file-safe version of `name`; returns the registered name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{safe}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    open_clip.add_model_config(path)
    return safe


def create_model(
        model: str,
        hf_text_model: str | None = None,
        lock_text: bool = False,
        siglip: bool = False,
        config_dir: Path | None = None,
        pretrained: str | None = None,
        lock_image: bool = False,
        lock_image_unlocked_groups: int = 0,
        lock_image_freeze_bn_stats: bool = False,
):
    """Builds a trainable open_clip model from a config name or JSON path.

    Returns (model, model_cfg, preprocess_train, preprocess_val, tokenizer). `model.logit_scale` is a 1-element
    parameter initialised to ln(1/0.07); with `siglip`, a `logit_bias` initialised to -10 and logit_scale to ln(10)
    (the SigLIP paper's init). `lock_text` freezes the whole text tower except its projection; `lock_image` freezes
    the image tower but for its last `lock_image_unlocked_groups` layer groups (open_clip's `lock_image_tower`; LiT,
    Zhai et al. 2022, is `lock_image` with pretrained image weights).
    """
    name, cfg = resolve_model_config(model, hf_text_model)
    if open_clip.get_model_config(name) != cfg:
        import tempfile

        name = _register_config(name, cfg, Path(config_dir or tempfile.mkdtemp(prefix="clipkit_cfg_")))
    kwargs = dict(nonscalar_logit_scale=True)
    if siglip:
        kwargs.update(init_logit_scale=torch.log(torch.tensor(10.0)).item(), init_logit_bias=-10.0)
    net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, output_dict=True, **kwargs)
    if lock_text:
        lock_text_tower(net)
    if lock_image:
        net.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn_stats)
    tokenizer = open_clip.get_tokenizer(name)
    return net, cfg, preprocess_train, preprocess_val, tokenizer


def lock_text_tower(net: nn.Module) -> None:
    """Freezes the text tower (for a pretrained one); the text projection stays trainable so the towers can still
    align."""
    if hasattr(net, "text") and hasattr(net.text, "lock"):
        # CustomTextCLIP (HF or custom text tower): open_clip freezes the encoder, keeps the projection trainable.
        net.text.lock(unlocked_layers=0, freeze_layer_norm=True)
        return
    for name in ("transformer", "token_embedding", "ln_final"):
        for p in getattr(net, name).parameters():
            p.requires_grad = False
    net.positional_embedding.requires_grad = False


def preprocess_cfg_of(net: nn.Module) -> Dict[str, Any]:
    cfg = getattr(net.visual, "preprocess_cfg", None)
    if cfg is None:
        return {}
    return asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(cfg)


def to_open_clip_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip's layout: `logit_scale`/`logit_bias` 0-dim, contiguous fp32 CPU tensors (bf16 training included)."""
    state = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if v.is_floating_point():
            v = v.float()
        state[k] = (v.reshape(()) if k in ("logit_scale", "logit_bias") else v).contiguous()
    return state


def export_open_clip(
        state_dict: Dict[str, torch.Tensor],
        model_cfg: Dict[str, Any],
        preprocess_cfg: Dict[str, Any],
        out_dir: Path,
) -> Path:
    """Writes `open_clip_config.json` + `open_clip_model.safetensors` that
    `open_clip.create_model_and_transforms("local-dir:OUT")` loads. For an HF text tower, its tokenizer files are copied
    too (open_clip's local-dir tokenizer reads them from that directory)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_open_clip_state_dict(state_dict), str(out_dir / OPEN_CLIP_WEIGHTS))
    with open(out_dir / OPEN_CLIP_CONFIG, "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    hf_tok = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_tok and Path(hf_tok).is_dir():
        for fname in HF_TOKENIZER_FILES:
            if (Path(hf_tok) / fname).is_file():
                shutil.copy2(Path(hf_tok) / fname, out_dir / fname)
    return out_dir


def load_open_clip(path: str, device: str = "cpu"):
    """Loads an exported model dir with open_clip itself: returns (model, preprocess_val, tokenizer)."""
    spec = path if path.startswith("local-dir:") else f"local-dir:{path}"
    net, _, preprocess_val = open_clip.create_model_and_transforms(spec, device=device)
    tokenizer = open_clip.get_tokenizer(spec)
    return net.eval(), preprocess_val, tokenizer
