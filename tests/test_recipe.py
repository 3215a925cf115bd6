"""Issue 11 in the training loop: the recipe's flags, loader extras, export, ZeRO-3 refusal, and exact resume with
everything on under DeepSpeed ZeRO-2 on 2 processes. The losses' math is tested against float64 references in
tests/test_losses_negatives.py, tests/test_queue_distill.py, tests/test_momentum.py and tests/test_ssl.py."""

import json

import pytest
import torch

from clipkit.augment import AugmentSettings, simclr_settings, train_transform
from clipkit.data import SampleExtras, build_train_loader
from clipkit.synthetic import write_train_shards
from clipkit.train.config import parse_config
from clipkit.train.errors import ConfigError
from clipkit.train.preflight import preflight
from clipkit.transforms import split_uint8
from tests._train import assert_same_weights, final_weights, losses, run_train

EVERYTHING = ["--queue-size", "48", "--momentum", "0.99", "--distill-alpha", "0.4", "--hard-negative-beta", "0.5",
              "--caption-negatives", "2", "--mask-duplicate-captions", "--image-ssl-weight", "1", "--aug-scale",
              "0.5,1", "--color-jitter", "0.8", "--grayscale", "0.2", "--blur", "0.5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_train_shards(d, n=4 * 48, per_shard=48, seed=0, size=32)
    return f"{d}/{{00000..00003}}.tar"


def args(spec, out, steps, *extra):
    return ["--model", "clipkit-tiny", "--train-data", spec, "--batch-size", "8", "--steps", str(steps), "--lr",
            "1e-3", "--warmup", "2", "--workers", "1", "--shuffle-buffer", "16", "--no-report", "--output-dir",
            str(out), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--queue-size", "-1"], r"--queue-size must be >= 0"),
    (["--queue-size", "64", "--momentum", "1.0"], r"--momentum must be in \[0, 1\)"),
    (["--momentum", "-0.1"], r"--momentum must be in \[0, 1\)"),
    (["--hard-negative-beta", "-1"], r"--hard-negative-beta must be a finite number >= 0"),
    (["--image-ssl-weight", "-0.5"], r"--image-ssl-weight must be a finite number >= 0"),
    (["--distill-alpha", "1.5"], r"--distill-alpha must be in \[0, 1\]"),
    (["--distill-alpha", "0.4", "--momentum", "0"], r"needs a momentum model"),
    (["--blur", "2"], r"--blur must be in \[0, 1\]"),
    (["--aug-scale", "0.9"], r"--aug-scale must be LO,HI"),
    (["--aug-scale", "0.9,0.5"], r"0 < LO <= HI <= 1"),
    (["--temperature-init", "0"], r"--temperature-init must be a finite number > 0"),
    (["--queue-size", "64", "--grad-accum", "2"], r"--grad-accum > 1 does not combine"),
    (["--hard-negative-beta", "1", "--loss", "siglip"], r"use them with --loss clip"),
    (["--export-momentum"], r"--export-momentum needs a momentum model"),
])
def test_bad_recipe_values_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--train-data", "x.tar", *flags])


def test_momentum_model_refused_under_zero3(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="not supported under ZeRO-3"):
        preflight(parse_config(args(shards, tmp_path, 2, "--queue-size", "64")), world_size=2)
    preflight(parse_config(args(shards, tmp_path, 2, "--queue-size", "64", "--momentum", "0")), world_size=2)


def test_queue_of_online_features_warns_at_start(caplog):
    """--momentum 0 collapsed a fresh model on Fashion-MNIST (BENCHMARKS.md): the run says so when it starts."""
    from clipkit.train.recipe import Recipe

    net = torch.nn.Linear(4, 4)
    with caplog.at_level("WARNING", logger="clipkit.train"):
        Recipe(parse_config(["--train-data", "x.tar", "--queue-size", "64", "--momentum", "0.995"]), net, 4,
               torch.device("cpu"))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="clipkit.train"):
        Recipe(parse_config(["--train-data", "x.tar", "--queue-size", "64", "--momentum", "0"]), net, 4,
               torch.device("cpu"))
    assert len(caplog.records) == 1 and "collapsed" in caplog.records[0].getMessage()


def test_loader_extras_are_seeded_views_and_caption_negatives(shards, tokenizer):
    """Two SimCLR views per image and N tokenised caption negatives per sample; the same batches on a rebuild."""
    import open_clip

    pre_cfg = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    main, _ = split_uint8(train_transform(32, pre_cfg, AugmentSettings(scale=(0.5, 1.0), blur=0.5)))
    views, _ = split_uint8(train_transform(32, pre_cfg, simclr_settings()))
    extras = SampleExtras(views=views, caption_negatives=3)

    def first_batch():
        loader = build_train_loader(shards, main, tokenizer, batch_size=4, num_workers=1, shuffle_buffer=8,
                                    extras=extras)
        return next(iter(loader))

    a, b = first_batch(), first_batch()
    assert a["image"].dtype == torch.uint8 and a["views"].shape == (4, 2, 3, 32, 32)
    assert a["neg_text"].shape == (4, 3, a["text"].shape[1])
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["neg_text"], b["neg_text"])
    assert not torch.equal(a["views"][:, 0], a["views"][:, 1])  # two different augmentations
    for i in range(4):  # every negative differs from its caption
        assert all(not torch.equal(a["neg_text"][i, j], a["text"][i]) for j in range(3))


@pytest.mark.slow
def test_everything_on_resumes_exactly_on_two_processes(shards, tmp_path):
    """Queue + momentum + distillation + hard negatives + caption negatives + duplicate masking + SLIP + SimCLR
    augmentations, ZeRO-2 on 2 processes: 12 steps straight equal 6 + resume 6 (losses to 1e-6, weights equal);
    the export has no SSL head; each loss term and the queue fill are logged."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(args(shards, straight, 12, *EVERYTHING), nproc=2)
    run_train(args(shards, resumed, 12, *EVERYTHING, "--stop-at", "6", "--save-every", "6"), nproc=2)
    assert (resumed / "checkpoints" / "step_00000006" / "recipe.safetensors").is_file()
    run_train(args(shards, resumed, 12, *EVERYTHING, "--resume", "auto", "--save-every", "6"), nproc=2)
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys() and not any(k.startswith("ssl_head") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_itc", "loss_distill", "loss_ssl", "pos_sim", "neg_sim", "queue_fill"):
        assert all(key in r for r in records), key
    assert records[0]["queue_fill"] == pytest.approx(16 / 48) and records[-1]["queue_fill"] == 1.0


def test_export_momentum_writes_the_ema_weights(shards, tmp_path):
    """--export-momentum: final/ holds the EMA model (it differs from the online one after training)."""
    online, ema = tmp_path / "online", tmp_path / "ema"
    common = ("--workers", "0", "--queue-size", "32", "--momentum", "0.9")
    run_train(args(shards, online, 3, *common))
    run_train(args(shards, ema, 3, *common, "--export-momentum"))
    a, b = final_weights(online), final_weights(ema)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert losses(online) == losses(ema)  # the same training; only the export differs
    # examples/recipe/export_momentum.py writes the same weights after the fact from the online run's checkpoint
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "export_momentum", Path(__file__).resolve().parents[1] / "examples" / "recipe" / "export_momentum.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(online), str(tmp_path / "after" / "final")]) == 0
    assert_same_weights(final_weights(tmp_path / "after"), b)
