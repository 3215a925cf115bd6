"""Property 15 of the reliability suite (issue 5): the data-prep and eval CLIs on 50,000 tiny samples finish and keep
memory flat. Each CLI runs in one process under `_rss_probe`, which samples VmRSS against the number of samples
processed so far: the growth from 20-40% of the samples to the end must stay under a bound far below what keeping
any per-sample image would cost (data prep: the dump table and one shard's rows are held by design; eval zero-shot:
4 bytes x classes of scores per image). RSS counts the data loader / pool worker processes too.

Eval's CLI sets glibc's mmap threshold to 64 KiB at start-up (clipkit.eval.cli.limit_heap_fragmentation): with the
default (a threshold that rises to the largest freed block), the heap fragmented around the 6 MB batch tensors and
RSS drifted up by about 2 KB per image with 2 loader workers and 6 KB per image with --workers 0."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests._train import REPO, env
from tests.data_prep_helpers import write_dump

N = 50_000
MICRO_MODEL = {  # a CLIP small enough that 50,000 images take seconds, not minutes, on 2 cores
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _tiny_jpegs(count: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _probe(target: str, arg: int, script: str, *args: str, extra_env=None, timeout: int = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.reliability._rss_probe", target, str(arg), "--", script, *args],
                          capture_output=True, text=True, env=env(extra_env), cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _growth_mb(result: dict, total: int) -> tuple:
    """(growth, early, peak) in MB: the highest RSS once 60% of the samples were done minus the highest between 20%
    and 40%. Maxima on both sides, so that the batches in flight between processes (a few MB each) cancel out."""
    samples = result["samples"]
    early = [rss for done, rss in samples if total * 0.2 <= done <= total * 0.4]
    late = [rss for done, rss in samples if done >= total * 0.6]
    assert early and late, f"too few samples: {samples[:5]} ... {samples[-5:]}"
    return (max(late) - max(early)) / 1024, max(early) / 1024, result["peak_kb"] / 1024


@pytest.mark.slow
def test_data_prep_cli_on_50k_samples_keeps_memory_flat(tmp_path):
    images = _tiny_jpegs(16)
    for i, data in enumerate(images):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    rows = [{"path": f"{i % len(images)}.jpg", "caption": f"tiny picture number {i}"} for i in range(N)]
    dump = write_dump(str(tmp_path / "dump.parquet"), rows, ["path", "caption"])
    out = tmp_path / "shards"
    result = _probe("clipkit.data_prep.shard:process_image", -1, str(REPO / "data_prep" / "build_shards.py"), dump,
                    "--path-col", "path", "--caption-col", "caption", "--output", str(out), "--samples-per-shard",
                    "5000", "--image-size", "8", "--workers", "1", "--threads", "2", "--no-progress")
    assert result["exit"] == 0 and result["progress"] == N
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["successes"] == N and manifest["complete_shards"] == N // 5000
    growth, early, peak = _growth_mb(result, N)
    print(f"\ndata prep, {N} samples: RSS {early:.0f} MB at 20-40%, peak {peak:.0f} MB, growth {growth:.1f} MB")
    assert growth < 32, (growth, early, peak)


@pytest.mark.slow
def test_eval_zeroshot_cli_on_50k_samples_keeps_memory_flat(tmp_path):
    from safetensors.torch import save_file

    from clipkit.models import create_model

    config = tmp_path / "micro-clip.json"
    config.write_text(json.dumps(MICRO_MODEL))
    model, *_ = create_model(str(config), config_dir=tmp_path / "cfg")
    weights = tmp_path / "micro.safetensors"
    save_file({k: v.reshape(()) if k == "logit_scale" else v.contiguous() for k, v in model.state_dict().items()},
              str(weights))

    images = _tiny_jpegs(16)
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(10)))
    per_shard = N // 5
    for s in range(5):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                for ext, data in (("jpg", images[i % len(images)]), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("5\n")
    output = tmp_path / "zs.json"
    result = _probe("clipkit.eval.zeroshot:encode_images", 1, str(REPO / "eval" / "zeroshot.py"), "--model",
                    str(config), "--pretrained", str(weights), "--dataset", f"wds:{root}", "--templates", "simple",
                    "--batch-size", "500", "--workers", "2", "--no-progress", "--output", str(output))
    assert result["exit"] == 0 and result["progress"] == N
    assert json.loads(output.read_text())["metrics"]["n"] == N
    growth, early, peak = _growth_mb(result, N)
    print(f"\neval zero-shot, {N} samples: RSS {early:.0f} MB at 20-40%, peak {peak:.0f} MB, growth {growth:.1f} MB")
    assert growth < 24, (growth, early, peak)
