"""Hugging Face text towers that travel with a checkpoint: a hub id in the config, the tower's files in the export.

open_clip builds an HF text tower from `text_cfg.hf_model_name` with `transformers.AutoConfig.from_pretrained(name)`
(the weights then come from the CLIP checkpoint). A local directory there ties `final/` to the machine that trained
it, so the export records the tower's hub id instead (`--hf-text-model-id`, or inferred: see `hub_id_of`) and ships
a copy of the tower's config and tokenizer files twice: at the top of `final/` (open_clip's `local-dir:` tokenizer
reads them there) and in Hugging Face's cache layout, `final/hf_cache/models--ORG--NAME/snapshots/REV/` with
`refs/main`, so that open_clip unchanged loads `local-dir:final` offline with `HF_HUB_CACHE=final/hf_cache
HF_HUB_OFFLINE=1` (online, with nothing set, transformers fetches the tower's small config.json from the hub).
clipkit's own loaders need neither: `local_tower_view` points the tower at `final/`'s own copy.

While training, the tower is staged as a cache entry too (`stage_tower`: symlinks to the given directory), so the
hub id rides along in the path open_clip builds from, and the export reads it back from there.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator

log = logging.getLogger(__name__)

HF_CACHE_DIR = "hf_cache"
HF_NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")
# Files open_clip and transformers read to rebuild the tower's architecture and its tokenizer (not its weights).
HF_TOWER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json",
    "merges.txt", "vocab.json", "spiece.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# How a model card names its own repository: `SentenceTransformer('org/name')`, `X.from_pretrained("org/name")`.
_CARD_ID = re.compile(r"""(?:SentenceTransformer|from_pretrained)\(\s*['"]"""
                      r"""([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)['"]""")


def check_hub_id(hub_id: str) -> str:
    """`hub_id` if it is a valid Hugging Face model id (`ORG/NAME` or `NAME`), else ValueError naming the rule."""
    if not _HUB_ID.match(hub_id) or "--" in hub_id or ".." in hub_id or hub_id.endswith((".", "-")):
        raise ValueError(f"{hub_id!r} is not a Hugging Face model id: expected ORG/NAME (letters, digits, '-', '_', "
                         "'.'; no '--' or '..'), e.g. sentence-transformers/all-MiniLM-L6-v2")
    return hub_id


def _id_from_cache_path(model_dir: Path) -> str | None:
    """`ORG/NAME` for a Hugging Face cache snapshot `.../models--ORG--NAME/snapshots/REV`."""
    parts = model_dir.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return "/".join(parts[-3][len("models--"):].split("--"))
    return None


def _id_from_card(model_dir: Path) -> str | None:
    """The repository a model card's own usage examples load (the most frequent one)."""
    try:
        text = (model_dir / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = Counter(m.group(1) for m in _CARD_ID.finditer(text))
    return found.most_common(1)[0][0] if found else None


def _id_from_config(model_dir: Path) -> str | None:
    """config.json's `_name_or_path`, when it is a hub id rather than a path (often the base model fine-tuned)."""
    try:
        name = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and "/" in name and not name.startswith((".", "/", "~")) and _HUB_ID.match(name):
        return name
    return None


def hub_id_of(model_dir: str | Path, override: str | None = None) -> str:
    """The hub id recorded for a local HF tower directory: `override` (--hf-text-model-id) if given; else the id in a
    Hugging Face cache path (`models--ORG--NAME/snapshots/REV`); else the id the dir's model card (README.md) loads
    in its usage examples; else config.json's `_name_or_path` (for a fine-tuned model that is often its base model,
    hence last); else `local/DIRNAME` with a warning (loads offline from the export's cache, not from the hub)."""
    if override:
        return check_hub_id(override)
    model_dir = Path(model_dir)
    for rule in (_id_from_cache_path, _id_from_card, _id_from_config):
        found = rule(model_dir)
        if found and _HUB_ID.match(found) and "--" not in found:
            return found
    safe = re.sub(r"[^\w.-]", "_", model_dir.resolve().name).strip("._-") or "text-tower"
    hub_id = f"local/{safe.replace('--', '-')}"
    log.warning("no hub id found for the text tower %s (no model card naming it, no _name_or_path): the export records "
                "%r; pass --hf-text-model-id ORG/NAME so open_clip can fetch its config online", model_dir, hub_id)
    return hub_id


def _is_local_path(name: Any) -> bool:
    return isinstance(name, str) and (os.path.isabs(name) or name.startswith(("./", "../", "~")) or os.path.isdir(name))


def portable_model_cfg(model_cfg: Dict[str, Any], override: str | None = None) -> Dict[str, Any]:
    """A copy of an open_clip model config whose HF tower names (`text_cfg.hf_model_name`/`hf_tokenizer_name`) are
    hub ids instead of local directories (`hub_id_of`), so it does not depend on where the tower was installed."""
    text_cfg = model_cfg.get("text_cfg") or {}
    if not any(_is_local_path(text_cfg.get(k)) for k in HF_NAME_KEYS):
        return model_cfg
    text_cfg = dict(text_cfg)
    for key in HF_NAME_KEYS:
        if _is_local_path(text_cfg.get(key)):
            text_cfg[key] = hub_id_of(text_cfg[key], override)
    return {**model_cfg, "text_cfg": text_cfg}


def _repo_dir(cache_root: Path, hub_id: str) -> Path:
    return Path(cache_root) / ("models--" + "--".join(hub_id.split("/")))


def write_hub_cache(src_dir: str | Path, cache_root: str | Path, hub_id: str, names: Iterable[str],
                    link: bool = False) -> Path:
    """Lays out `names` (those present in `src_dir`) as the Hugging Face cache entry of `hub_id` under `cache_root`:
    `models--ORG--NAME/snapshots/REV/NAME...` and `refs/main` = REV, REV being the sha1 of the tower's small files
    (and, with `link`, of `src_dir`'s path). Copies the files, or with `link` symlinks them (staging a tower with its
    weights). Every file is written under a temporary name and renamed into place, so processes that stage the same
    tower at once (one per rank) do not trip over each other. Returns the snapshot directory."""
    src_dir = Path(src_dir).resolve()
    present = sorted(n for n in names if (src_dir / n).exists())
    digest = hashlib.sha1(str(src_dir).encode() if link else b"")
    for name in present:
        if name in HF_TOWER_FILES and (src_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (src_dir / name).read_bytes())
    rev = digest.hexdigest()
    repo = _repo_dir(Path(cache_root), check_hub_id(hub_id))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name in present:
        tmp = snapshot / f".{name}.{os.getpid()}.tmp"
        if link:
            os.symlink(src_dir / name, tmp)
        elif (src_dir / name).is_file():
            shutil.copy2(src_dir / name, tmp)
        else:
            continue
        os.replace(tmp, snapshot / name)
    tmp = repo / "refs" / f".main.{os.getpid()}.tmp"
    tmp.write_text(rev, encoding="utf-8")
    os.replace(tmp, repo / "refs" / "main")
    return snapshot


def stage_tower(model_dir: str | Path, staging_root: str | Path, override: str | None = None) -> Path:
    """The tower directory to build from while training: a cache entry of its hub id under `staging_root` whose files
    are symlinks to `model_dir`'s (weights included), so `export_tower` reads the hub id back from the path."""
    model_dir = Path(model_dir).resolve()
    names = [p.name for p in model_dir.iterdir()]
    return write_hub_cache(model_dir, staging_root, hub_id_of(model_dir, override), names, link=True)


def export_tower(model_cfg: Dict[str, Any], out_dir: str | Path) -> Dict[str, Any]:
    """For an HF text tower in a local directory: copies its config.json (from `hf_model_name`) and tokenizer files
    (from `hf_tokenizer_name`) into `out_dir`, and lays them out in `out_dir/hf_cache` as the cache entry of each hub
    id; returns the config with hub ids for the tower (`model_cfg` unchanged for any other tower)."""
    text_cfg = model_cfg.get("text_cfg") or {}
    portable = portable_model_cfg(model_cfg)
    if portable is model_cfg:
        return model_cfg
    out_dir = Path(out_dir)
    sources = {"hf_model_name": ("config.json",),
               "hf_tokenizer_name": tuple(n for n in HF_TOWER_FILES if n != "config.json")}
    for key, files in sources.items():
        src = text_cfg.get(key)
        if _is_local_path(src) and Path(src).is_dir():
            for name in files:
                if (Path(src) / name).is_file():
                    shutil.copy2(Path(src) / name, out_dir / name)
    for hub_id in sorted({portable["text_cfg"][k] for k in HF_NAME_KEYS if k in portable["text_cfg"]}):
        write_hub_cache(out_dir, out_dir / HF_CACHE_DIR, hub_id, HF_TOWER_FILES)
    return portable


def _snapshot_of(export: Path, hub_id: str) -> Path | None:
    repo = _repo_dir(export / HF_CACHE_DIR, hub_id)
    try:
        snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


@contextlib.contextmanager
def local_tower_view(export: str | Path) -> Iterator[Path]:
    """A directory open_clip's `local-dir:` loads like `export`, with an HF text tower resolved to the export's own
    copy of its files (`export/config.json`, else its `hf_cache` entry): no network, no environment, wherever the
    export now lives. Yields `export` itself when there is nothing to resolve; else a temporary directory (removed on
    exit) of symlinks to `export`'s files and a rewritten `open_clip_config.json`."""
    from clipkit.models import OPEN_CLIP_CONFIG

    export = Path(export).resolve()
    with open(export / OPEN_CLIP_CONFIG, encoding="utf-8") as f:
        config = json.load(f)
    text_cfg = (config.get("model_cfg") or {}).get("text_cfg") or {}
    names = {k: text_cfg[k] for k in HF_NAME_KEYS if isinstance(text_cfg.get(k), str)}
    local = {}
    for key, name in names.items():
        if (export / "config.json").is_file():
            local[key] = str(export)
        elif not _is_local_path(name) and _snapshot_of(export, name) is not None:
            local[key] = str(_snapshot_of(export, name))
    if not local:
        yield export
        return
    config["model_cfg"]["text_cfg"] = {**text_cfg, **local}
    with tempfile.TemporaryDirectory(prefix="clipkit_export_") as tmp:
        view = Path(tmp)
        for entry in export.iterdir():
            if entry.name != OPEN_CLIP_CONFIG:
                (view / entry.name).symlink_to(entry)
        with open(view / OPEN_CLIP_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        yield view
