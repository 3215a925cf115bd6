"""clipkit.plan: FLOPs per sample against torch's FLOP counter on a real forward + backward, the ZeRO state table,
the largest batch search, the command line (text, JSON, sweep, errors). Memory against measured runs:
tests/test_plan_memory.py."""

import json

import pytest
import torch

from clipkit.plan.cli import main as plan_main
from clipkit.plan.cli import parse_batch, parse_count, parse_sweep
from clipkit.plan.flops import step_flops
from clipkit.plan.memory import largest_batch, model_states
from clipkit.plan.model import profile_model

CAL = {"zero_transient": {p: {str(s): {"fixed_bytes": 1e8, "bytes_per_param": 10.0} for s in range(4)}
                          for p in ("fp32", "bf16")},
       "cpu_train": {"model": "clipkit-tiny", "batch_size": 64, "samples_per_s": 150.0, "cores": 2,
                     "flops_per_s_per_core": 3e10}}


def measured_flops(model: str, batch: int) -> float:
    """torch's FlopCounterMode over one real CPU forward + backward of the model and clipkit's loss."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clipkit.losses import ContrastiveLoss
    from clipkit.models import create_model

    torch.manual_seed(0)
    net, cfg, _, _, tokenizer = create_model(model)
    net.train()
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size)
    texts = tokenizer([f"a photo of thing {i}" for i in range(batch)])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = net(images, texts)
        ContrastiveLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return counter.get_total_flops() / batch


@pytest.mark.parametrize("model", ["clipkit-tiny", "clipkit-tiny-resnet"])
def test_flops_per_sample_equal_torch_counter(model):
    batch = 4
    predicted = step_flops(profile_model(model, "fp32"), batch, 1)["model"] / batch
    assert predicted == pytest.approx(measured_flops(model, batch), rel=1e-9)


def test_profile_counts_from_the_model():
    from clipkit.models import create_model

    net, *_ = create_model("clipkit-tiny")
    p = profile_model("clipkit-tiny", "fp32")
    assert p.params == sum(x.numel() for x in net.parameters()) and p.embed_dim == 128
    assert p.tower_flops > 2 * p.forward_flops > 0  # backward costs about twice the forward
    half = profile_model("clipkit-tiny", "bf16")
    assert 0.45 < half.activation_bytes / p.activation_bytes < 0.75  # bf16 activations, a few fp32 statistics
    ckpt = profile_model("clipkit-tiny", "fp32", grad_checkpointing=True)
    assert ckpt.activation_bytes < p.activation_bytes / 2 and ckpt.recompute_bytes > 0


def test_zero_state_table():
    p, n = 1000, 4
    assert model_states(p, p, 0, n, "fp32") == {"parameters": 4000, "master_weights": 0.0, "optimizer": 8000}
    assert model_states(p, p, 0, n, "bf16") == {"parameters": 2000, "master_weights": 4000.0, "optimizer": 8000}
    assert model_states(p, p, 2, n, "bf16") == {"parameters": 2000, "master_weights": 1000.0, "optimizer": 2000}
    assert model_states(p, p, 3, n, "bf16") == {"parameters": 500, "master_weights": 1000.0, "optimizer": 2000}
    assert model_states(p, 100, 1, n, "fp32") == {"parameters": 4000, "master_weights": 100.0, "optimizer": 200}
    assert model_states(p, p, 3, n, "fp32", persistent=40)["parameters"] == 4 * (250 + 40)  # kept whole, plus shard


def test_largest_batch_search():
    assert largest_batch(lambda b: b <= 777) == 777
    assert largest_batch(lambda b: b <= 1) == 1 and largest_batch(lambda b: False) == 0
    assert largest_batch(lambda b: True, limit=5000) == 5000


def test_parse_numbers():
    assert parse_count("12.8B") == 12.8e9 and parse_count("1e9") == 1e9 and parse_count("400M") == 4e8
    assert parse_batch("32k") == 32768 and parse_batch("90112") == 90112
    assert parse_sweep(["gpus=64,128", "global_batch=16k,32k"]) == {"gpus": [64, 128], "global_batch": [16384, 32768]}
    for bad in (lambda: parse_count("lots"), lambda: parse_batch("1.5"), lambda: parse_sweep(["colour=red"])):
        with pytest.raises(ValueError):
            bad()


def run(args, capsys, tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(CAL))
    code = plan_main([str(a) for a in args] + ["--calibration", str(cal)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_plan(capsys, tmp_path):
    code, out, err = run(["--model", "clipkit-tiny", "--gpu", "h100", "--gpus", "16", "--global-batch", "4096",
                          "--samples", "100M", "--zero", "2", "--json", "--urls", "1e6", "--memory-gib", "2"],
                         capsys, tmp_path)
    assert code == 0, err
    plan = json.loads(out)
    mem, step, run_ = plan["memory_per_rank"], plan["step"], plan["run"]
    assert step["local_batch"] == 256 and run_["steps"] == -(-100_000_000 // 4096)
    assert mem["total"] == pytest.approx(sum(mem[k] for k in ("parameters", "master_weights", "optimizer",
                                                              "transient", "activations", "loss")))
    assert run_["gpu_hours"] == pytest.approx(run_["wall_hours"] * 16)
    assert step["samples_per_s"] == pytest.approx(4096 / step["step_s"])
    assert plan["device"]["mfu_source"].startswith("assumed")  # no GPU run in this calibration
    assert plan["data"]["shards"]["shards"] == 10_000 and "note" in plan["data"]["prep"]  # no shards calibration


def test_cli_text_and_largest_batch(capsys, tmp_path):
    args = ["--model", "clipkit-tiny", "--gpu", "a100-40gb", "--gpus", "8", "--global-batch", "8192", "--zero", "3",
            "--memory-gib", "1.5"]
    code, out, err = run(args, capsys, tmp_path)
    assert code == 0, err
    for word in ("parameters", "Adam m and v", "activations", "largest local batch", "by ZeRO stage", "samples/s",
                 "GPU-hours", "feature all-gather", "loaders must deliver"):
        assert word in out, word
    code, out, _ = run(args + ["--json"], capsys, tmp_path)
    plan = json.loads(out)
    biggest = plan["memory_per_rank"]["max_local_batch"]
    from clipkit.plan.memory import rank_memory

    profile = profile_model("clipkit-tiny", "bf16")
    capacity = plan["memory_per_rank"]["capacity"]
    assert rank_memory(profile, biggest, 8, 3, CAL).total <= capacity < rank_memory(profile, biggest + 1, 8, 3,
                                                                                      CAL).total


def test_cli_sweep(capsys, tmp_path):
    code, out, err = run(["--model", "clipkit-tiny", "--gpu", "h100", "--memory-gib", "2", "--sweep", "gpus=8,16",
                          "global_batch=4k,8k"], capsys, tmp_path)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 + 4 and "GPU-hours" in lines[0]
    code, out, _ = run(["--model", "clipkit-tiny", "--gpu", "h100", "--memory-gib", "2", "--sweep", "gpus=8,16",
                        "--json"], capsys, tmp_path)
    plans = json.loads(out)
    assert [p["request"]["gpus"] for p in plans] == [8, 16]
    # twice the GPUs, same global batch: half the local batch, less time per step
    assert plans[1]["step"]["local_batch"] * 2 == plans[0]["step"]["local_batch"]
    assert plans[1]["step"]["compute_s"] < plans[0]["step"]["compute_s"]


@pytest.mark.parametrize("args, message", [
    (["--gpu", "tpu9"], "unknown --gpu 'tpu9'"),
    (["--gpus", "3", "--global-batch", "1000"], "not a multiple of --gpus 3"),
    (["--sweep", "colour=red"], "KEY one of"),
    (["--samples", "many"], "not a count"),
])
def test_cli_errors(args, message, capsys, tmp_path):
    code, out, err = run(["--model", "clipkit-tiny"] + args, capsys, tmp_path)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_calibration_section_is_named(capsys, tmp_path):
    cal = tmp_path / "empty.json"
    cal.write_text("{}")
    code = plan_main(["--model", "clipkit-tiny", "--gpus", "8", "--global-batch", "64", "--calibration", str(cal)])
    err = capsys.readouterr().err
    assert code == 2 and "bench/plan_memory.py --calibration" in err
