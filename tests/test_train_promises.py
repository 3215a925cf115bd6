"""Issue 9: what README and the docstrings promise about the training core, each checked end to end.

Unequal shards on 2 ranks (every sample once per epoch, pads counted, exact resume in the pad phase), the resume
fingerprint's data fields, zero-shot logged whenever computed, DeepSpeed's grad norm, grad-accum N x B == batch N*B
for every parameter (logit_scale and SigLIP's logit_bias included; 1 and 2 processes), and --lock-image.
"""

import collections
import json

import pytest
import torch

from clipkit.models import create_model
from clipkit.synthetic import CLASSES, write_eval_folder, write_train_shards
from tests._shards import make_shards
from tests._train import assert_same_weights, final_weights, losses, run_train
from tests.reliability._helpers import keys_by_epoch, recorded_batches, write_tar


def args(spec, out, steps, *extra):
    return ["--model", "clipkit-tiny", "--train-data", spec, "--batch-size", "8", "--steps", str(steps), "--lr", "1e-3",
            "--warmup", "2", "--shuffle-buffer", "8", "--no-report", "--output-dir", str(out), *extra]


def trained_keys(run_dir):
    """epoch -> Counter of keys trained in real (not pad) batches, over all ranks; and all pad keys."""
    records = recorded_batches(run_dir)
    pads = [k for rec in records.values() for k in rec["pad_keys"]]
    return {e: collections.Counter(keys) for e, keys in keys_by_epoch(records).items()}, pads


@pytest.mark.slow
def test_unequal_shards_on_two_ranks_train_every_sample_once(tmp_path):
    """Shards of 96, 64 and 32 samples, 2 ranks x 2 workers, batch 8: issue 9 saw epoch 0 end after 8 steps with 64
    samples never trained. Split by samples, each worker holds 48: 12 steps per epoch, every key once."""
    d = tmp_path / "shards"
    keys = []
    for i, n in enumerate((96, 64, 32)):
        keys += make_shards(str(d), 1, n, seed=i, first_index=i).good_keys
    out = tmp_path / "run"
    out.mkdir()
    run_train(args(f"{d}/{{00000..00002}}.tar", out, 12, "--workers", "2"), nproc=2,
              extra_env={"CLIPKIT_TEST_RECORD_BATCHES": str(out)})
    by_epoch, pads = trained_keys(out)
    assert list(by_epoch) == [0] and by_epoch[0] == collections.Counter(keys) and pads == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_counts"]["ok"] == 192 and summary["padded_samples"] == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["grad_norm"] > 0 for m in metrics)  # DeepSpeed's norm (issue 9.5), logged every step
    assert all(m["tflops"] > 0 for m in metrics)


@pytest.mark.slow
def test_a_short_rank_pads_and_resumes_exactly_in_the_pad_phase(tmp_path):
    """Shards of 32 and 16 good samples and one of 16 captions without images: each rank reads 32 samples, one with
    32 good (4 batches), the other with 16 (2 batches). The short rank pads 2 batches with its own epoch's first ones
    (16 samples, counted); a run stopped at step 3 (a pad step) resumes with the same losses and weights."""
    d = tmp_path / "shards"
    write_train_shards(d, n=48, per_shard=32, seed=3, size=32)
    write_tar(d / "00002.tar", [(f"9{i:05d}.txt", b"a caption without an image") for i in range(16)])
    spec = f"{d}/{{00000..00002}}.tar"
    extra = ("--workers", "1", "--max-skip-rate", "0.5", "--save-every", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
    env = {"CLIPKIT_TEST_RECORD_BATCHES": str(straight)}
    run_train(args(spec, straight, 6, *extra), nproc=2, extra_env=env)
    by_epoch, pads = trained_keys(straight)
    assert sum(by_epoch[0].values()) == 48 and set(by_epoch[0].values()) == {1}  # every good sample once
    assert len(pads) == 16 and set(pads) <= set(by_epoch[0]) and len(set(pads)) == 16
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["padded_samples"] == 16  # epoch 0's pads; epoch 1 trains 2 steps, both ranks have them
    padded = [json.loads(line)["padded_samples"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert padded[:4] == [0, 0, 8, 8]  # steps 3 and 4: one rank's batch is a pad

    run_train(args(spec, resumed, 6, *extra, "--stop-at", "3"), nproc=2)
    state = json.loads((resumed / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert [r["pad_position"] is not None for r in state["ranks"]].count(True) == 1  # the short rank is padding
    run_train(args(spec, resumed, 6, *extra, "--resume", "auto"), nproc=2)
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert_same_weights(final_weights(straight), final_weights(resumed))


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("four")
    write_train_shards(d, n=4 * 32, per_shard=32, seed=0, size=32)
    return d


def test_resume_refuses_a_changed_shard_list_or_seed(four_shards, tmp_path):
    out = tmp_path / "run"
    run_train(args(f"{four_shards}/{{00000..00003}}.tar", out, 2, "--workers", "0"))
    fewer = run_train(args(f"{four_shards}/{{00000..00002}}.tar", out, 4, "--workers", "0", "--resume", "auto"),
                      check=False)
    assert fewer.returncode == 5, fewer.stderr[-2000:]
    line = next(x for x in fewer.stderr.splitlines() if x.startswith("error: "))
    assert "--train-data: checkpoint has '4 shards (128 samples)" in line and "this run has '3 shards (96" in line
    seed = run_train(args(f"{four_shards}/{{00000..00003}}.tar", out, 4, "--workers", "0", "--resume", "auto",
                          "--seed", "1"), check=False)
    assert seed.returncode == 5 and "--seed: checkpoint has 0, this run has 1" in seed.stderr, seed.stderr[-2000:]
    import shutil  # the same shards in another directory: the fingerprint holds names, not paths

    moved = shutil.copytree(four_shards, tmp_path / "moved")
    run_train(args(f"{moved}/{{00000..00003}}.tar", out, 4, "--workers", "0", "--resume", "auto"))
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_zeroshot_is_logged_whenever_it_is_computed(four_shards, tmp_path):
    """--zeroshot-every 3 --log-every 2 over 7 steps: zero-shot at steps 3 and 6 (and the final one at 7), although
    3 is not a logged step (issue 9 saw only 6 and 7)."""
    write_eval_folder(tmp_path / "eval", 30, seed=1, classes=CLASSES[:3])
    out = tmp_path / "run"
    run_train(args(f"{four_shards}/{{00000..00003}}.tar", out, 7, "--workers", "0", "--zeroshot-data",
                   f"folder:{tmp_path / 'eval'}", "--zeroshot-every", "3", "--log-every", "2"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records if "zeroshot/acc1" in r}) == [3, 6, 7]
    assert sorted({r["step"] for r in records if "loss" in r}) == [2, 3, 4, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("loss, nproc", [("clip", 0), ("siglip", 0), ("clip", 2), ("siglip", 2)])
def test_grad_accum_equals_the_full_batch_for_every_parameter(four_shards, tmp_path, loss, nproc):
    """One step at batch B x grad-accum 2 equals one step at batch 2B, parameter by parameter, logit_scale (and
    SigLIP's logit_bias) included: clipkit gives them their full-batch gradient once, where open_clip's accum_freq
    gives them accum_freq times it. Under 2 processes: DeepSpeed ZeRO-2, per-process batch 8 vs 4 x 2.

    AdamW's first update is lr * g / (|g| + eps): with the default eps, parameters whose gradient is near eps turn
    float rounding into visible differences, so eps = 1 and lr = 1 make the update ~ the gradient itself."""
    spec = f"{four_shards}/{{00000..00003}}.tar"
    big = 16 if nproc == 0 else 8
    base = ["--workers", "0", "--shuffle-buffer", "0", "--grad-clip", "0", "--warmup", "1", "--lr", "1", "--eps", "1",
            "--wd", "0", "--loss", loss]
    a, b = tmp_path / "full", tmp_path / "accum"
    run_train(args(spec, a, 1, *base, "--batch-size", str(big)), nproc=nproc)
    run_train(args(spec, b, 1, *base, "--batch-size", str(big // 2), "--grad-accum", "2"), nproc=nproc)
    assert abs(losses(a)[1] - losses(b)[1]) < 1e-5
    wa, wb = final_weights(a), final_weights(b)
    scalars = ["logit_scale"] + (["logit_bias"] if loss == "siglip" else [])
    init = create_model("clipkit-tiny", siglip=loss == "siglip")[0].state_dict()
    for name in scalars:  # it moved, by the same amount
        assert abs(wa[name].item() - init[name].item()) > 1e-3, name
        assert abs(wa[name].item() - wb[name].item()) < 1e-6, (name, wa[name].item(), wb[name].item())
    assert_same_weights(wa, wb, atol=1e-5)


def test_lock_image_freezes_the_image_tower(four_shards, tmp_path):
    """LiT: --lock-image trains the text tower only (open_clip's lock_image_tower); with unlocked groups the last
    ones train too."""
    model, *_ = create_model("clipkit-tiny", lock_image=True)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
    partly, *_ = create_model("clipkit-tiny", lock_image=True, lock_image_unlocked_groups=1)
    assert partly.visual.proj.requires_grad and not partly.visual.conv1.weight.requires_grad

    out = tmp_path / "run"
    run_train(args(f"{four_shards}/{{00000..00003}}.tar", out, 2, "--workers", "0", "--lock-image"))
    from accelerate.utils import set_seed

    set_seed(0)  # the run's seed: the same initial weights
    init = {k: v.float() for k, v in create_model("clipkit-tiny")[0].state_dict().items()}
    final = final_weights(out)
    assert all(torch.equal(final[k], init[k].reshape(final[k].shape)) for k in final if k.startswith("visual."))
    assert not torch.equal(final["text_projection"], init["text_projection"])
