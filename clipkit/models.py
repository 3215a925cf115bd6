"""Model construction on top of open_clip, and export back to open_clip's format.

Architectures are open_clip JSON configs (`embed_dim`, `vision_cfg`, `text_cfg`). clipkit's own configs live in
`clipkit/model_configs/` and are registered with `open_clip.add_model_config`, so
`open_clip.create_model("clipkit-tiny")` works once `register_model_configs()` has run.

While training, `logit_scale` (and `logit_bias`) are kept as 1-element tensors: DeepSpeed 0.19 cannot broadcast 0-dim
parameters ("self.dim() cannot be 0 to view Float as Byte"). `export_open_clip` writes them back 0-dim, the shape
open_clip's pretrained checkpoints use.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Tuple

import open_clip
import torch
from torch import nn

from clipkit.hf_text import HF_TOWER_FILES, export_tower, local_tower_view, stage_tower

CONFIG_DIR = Path(__file__).parent / "model_configs"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
HF_TOKENIZER_FILES = HF_TOWER_FILES  # what final/ carries of an HF text tower (config + tokenizer)

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
        init_logit_scale: float | None = None,
        hf_text_model_id: str | None = None,
        frozen_text_dropout: bool = False,
        lock_text_freeze_layer_norm: bool = True,
):
    """Builds a trainable open_clip model from a config name or JSON path.

    Returns (model, model_cfg, preprocess_train, preprocess_val, tokenizer). `model.logit_scale` is a 1-element
    parameter initialised to ln(1/0.07); with `siglip`, a `logit_bias` initialised to -10 and logit_scale to ln(10)
    (the SigLIP paper's init). `lock_text` freezes the whole text tower except its projection; `lock_image` freezes
    the image tower but for its last `lock_image_unlocked_groups` layer groups (open_clip's `lock_image_tower`; LiT,
    Zhai et al. 2022, is `lock_image` with pretrained image weights). `init_logit_scale` replaces the initial
    logit_scale (ln(1 / temperature)).

    `hf_text_model`: the tower is built from a Hugging Face cache entry of its hub id (`hf_text_model_id`, or
    inferred: `clipkit.hf_text.hub_id_of`) staged in `config_dir/hf_cache` as symlinks to that directory, so the
    returned `model_cfg` names the hub id in its path and `export_open_clip` records the id, not this machine's path.
    `frozen_text_dropout` (with `lock_text`): False (the default) pins the frozen tower in eval mode (no dropout,
    whatever `model.train()` is called); True lets it follow the model's mode. `lock_text_freeze_layer_norm=False`
    leaves the frozen HF tower's LayerNorm gains and biases trainable (open_clip_train's default).
    """
    import tempfile

    name, cfg = resolve_model_config(model, hf_text_model)
    config_dir = Path(config_dir) if config_dir else None
    if hf_text_model:
        config_dir = config_dir or Path(tempfile.mkdtemp(prefix="clipkit_cfg_"))
        staged = str(stage_tower(hf_text_model, config_dir / "hf_cache", hf_text_model_id))
        cfg["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": staged, "hf_tokenizer_name": staged}
    if open_clip.get_model_config(name) != cfg:
        name = _register_config(name, cfg, config_dir or Path(tempfile.mkdtemp(prefix="clipkit_cfg_")))
    kwargs = dict(nonscalar_logit_scale=True)
    if siglip:
        kwargs.update(init_logit_scale=torch.log(torch.tensor(10.0)).item(), init_logit_bias=-10.0)
    if init_logit_scale is not None:
        kwargs["init_logit_scale"] = init_logit_scale
    net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, output_dict=True, **kwargs)
    if lock_text:
        lock_text_tower(net, dropout=frozen_text_dropout, freeze_layer_norm=lock_text_freeze_layer_norm)
    if lock_image:
        net.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn_stats)
    tokenizer = open_clip.get_tokenizer(name)
    return net, cfg, preprocess_train, preprocess_val, tokenizer


def lock_text_tower(net: nn.Module, dropout: bool = True, freeze_layer_norm: bool = True) -> None:
    """Freezes the text tower (for a pretrained one); the text projection stays trainable so the towers can still
    align. `dropout=False` pins the frozen encoder in eval mode: `net.train()` leaves it in eval mode, so it sees each
    caption the same way every time (open_clip_train leaves it in train mode: its dropout stays on).
    `freeze_layer_norm=False`: an HF tower's LayerNorm parameters stay trainable (open_clip's `lock(...,
    freeze_layer_norm=False)`, open_clip_train's default); open_clip's own text tower freezes its ln_final anyway."""
    if hasattr(net, "text") and hasattr(net.text, "lock"):
        # CustomTextCLIP (HF or custom text tower): open_clip freezes the encoder, keeps the projection trainable.
        net.text.lock(unlocked_layers=0, freeze_layer_norm=freeze_layer_norm)
        frozen = [getattr(net.text, "transformer", None)]
    else:
        for name in ("transformer", "token_embedding", "ln_final"):
            for p in getattr(net, name).parameters():
                p.requires_grad = False
        net.positional_embedding.requires_grad = False
        frozen = [net.transformer, net.token_embedding, net.ln_final]
    if not dropout:
        for module in frozen:
            if module is not None:
                pin_eval_mode(module)


def _train_in_eval_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def pin_eval_mode(module: nn.Module) -> None:
    """Puts `module` in eval mode and keeps it there: its `train(mode)` becomes `train(False)` (a bound method on the
    instance, so deepcopies of the model, e.g. a momentum encoder, keep their own pinned copy)."""
    import types

    module.train = types.MethodType(_train_in_eval_mode, module)
    module.eval()


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
    `open_clip.create_model_and_transforms("local-dir:OUT")` loads. An HF text tower from a local directory is
    recorded by its hub id, and its config and tokenizer files are copied into OUT (open_clip's local-dir tokenizer
    reads them there) and into OUT/hf_cache in Hugging Face's cache layout (see `clipkit.hf_text`): OUT loads on any
    machine, with `HF_HUB_CACHE=OUT/hf_cache HF_HUB_OFFLINE=1` offline."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_open_clip_state_dict(state_dict), str(out_dir / OPEN_CLIP_WEIGHTS))
    model_cfg = export_tower(model_cfg, out_dir)
    with open(out_dir / OPEN_CLIP_CONFIG, "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    return out_dir


def load_open_clip(path: str, device: Any = "cpu"):
    """Loads an exported model dir with open_clip itself (its `local-dir:` loader): returns (model in eval mode,
    preprocess_val, tokenizer). An HF text tower is built from the export's own copy of its config, wherever the
    directory now lives and whatever the working directory (`clipkit.hf_text.local_tower_view`): no network, no
    HF_HUB_CACHE needed."""
    export = path[len("local-dir:"):] if path.startswith("local-dir:") else path
    with local_tower_view(export) as view:
        spec = f"local-dir:{view}"
        net, _, preprocess_val = open_clip.create_model_and_transforms(spec, device=device)
        tokenizer = open_clip.get_tokenizer(spec)
    return net.eval(), preprocess_val, tokenizer
