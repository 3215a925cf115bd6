"""Issue 15: train/main.py under bad input answers with one `error: ...` line and a distinct exit code, fast, with no
process left behind, under plain python and under `accelerate launch` with 2 processes.

Flag and file checks run in-process through parse_config + preflight (what main.py runs before any process group);
a few of them, and every data case, also run as real launches with a timeout.
"""

import re
import time

import pytest

from clipkit.train.config import parse_config
from clipkit.train.errors import EXIT_CHECKPOINT, EXIT_DATA, EXIT_USAGE, ConfigError, UserError
from clipkit.train.preflight import preflight
from tests.reliability._helpers import launch_train, write_tar

FAST = 120  # seconds: every case must fail well within this, not hang (start-up alone is ~10 s on a busy machine)


def txt_only_shard(path, n=300):
    """A shard whose samples are only captions: no image anywhere."""
    return str(write_tar(path, [(f"{i:06d}.txt", f"caption {i}".encode()) for i in range(n)]))


def base(shards, out, *extra):
    return ["--model", "clipkit-tiny", "--train-data", shards, "--batch-size", "8", "--steps", "4", "--workers", "1",
            "--output-dir", str(out), "--no-progress", "--no-tensorboard", "--no-report", *extra]


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_error(result, code: int, pattern: str, started: float, nproc: int = 0):
    elapsed = time.monotonic() - started
    assert elapsed < FAST, f"took {elapsed:.0f} s\n{result.explain()}"
    assert result.leftovers == [], result.explain()
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.explain()  # rank 0 only, once
    assert re.search(pattern, lines[0]), lines[0]
    # no traceback of ours (under a launcher, the launcher prints its own for the failed child)
    assert not re.search(r'File ".*(/clipkit/|train/main\.py)', result.stderr), result.explain()
    if nproc:  # the launcher exits 1 and names the ranks' exit code in its failure summary
        assert result.returncode != 0 and f"exitcode  : {code}" in result.stderr, result.explain()
    else:
        assert result.returncode == code, result.explain()


# ------------------------------------------------------------------ flags and files, before anything is built
@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], r"--lr must be a finite number > 0, got -1.0"),
    (["--wd", "-0.1"], r"--wd must be >= 0"),
    (["--beta2", "1.0"], r"--beta2 must be in \[0, 1\)"),
    (["--batch-size", "0"], r"--batch-size must be >= 1"),
    (["--warmup", "-3"], r"--warmup must be >= 0"),
    (["--stop-at", "9", "--steps", "5"], r"--stop-at must be in \[1, --steps=5\]"),
    (["--loss-chunk-size", "0"], r"--loss-chunk-size must be >= 1"),
    (["--keep-last", "1"], r"--keep-last must be >= 2"),
    (["--zeroshot-every", "5"], r"--zeroshot-every needs --zeroshot-data"),
    (["--lock-text", "--lock-image"], r"pick one"),
])
def test_bad_flag_values_are_config_errors(flags, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(["--train-data", "x.tar", *flags])
    assert e.value.exit_code == EXIT_USAGE


def test_files_and_paths_checked_before_start(clean_shards, tmp_path):
    def check(*flags, config=None):
        argv = ["--train-data", clean_shards.spec, "--output-dir", str(tmp_path / "out"), *flags]
        with pytest.raises(UserError) as e:
            preflight(parse_config(argv + (["--config", str(config)] if config else [])), world_size=1)
        return e.value

    bad_json = tmp_path / "model.json"
    bad_json.write_text('{"embed_dim": 64,\n  "vision_cfg": {"layers": 2,,}\n}')
    err = check("--model", str(bad_json))
    assert err.exit_code == EXIT_USAGE and "malformed JSON at line 2, column 30" in str(err), err
    (tmp_path / "afile").write_text("x")
    err = check("--output-dir", str(tmp_path / "afile"))
    assert "exists and is not a directory" in str(err)
    err = check("--resume", str(tmp_path / "nope"))
    assert err.exit_code == EXIT_CHECKPOINT and "no such checkpoint directory" in str(err)
    err = check("--hf-text-model", str(tmp_path))
    assert "no Hugging Face config.json" in str(err)
    err = check("--pretrained", str(tmp_path / "w.safetensors"))
    assert "--pretrained" in str(err) and "no such file" in str(err)
    err = check("--zeroshot-data", f"folder:{tmp_path}/missing")
    assert "--zeroshot-data" in str(err) and "does not exist" in str(err)
    err = check("--zeroshot-data", f"folder:{tmp_path}", "--zeroshot-templates", str(tmp_path / "prompts.txt"))
    assert err.exit_code == EXIT_USAGE and "--zeroshot-templates" in str(err) and "nor a file" in str(err), err
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "junk.pt").write_bytes(b"<html>404</html>")
    for junk in ("junk.safetensors", "junk.pt"):
        err = check("--pretrained", str(tmp_path / junk))
        assert err.exit_code == EXIT_USAGE and "not a readable weights file" in str(err), err
    err = check("--resampled", "--train-num-samples", "10", "--batch-size", "16")
    assert "fewer than one global batch of 16" in str(err)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.1\nbatch_size: [8\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3, column 6"):
        parse_config(["--config", str(yaml_file)])
    yaml_file.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"lr must be float, got 'fast'"):
        parse_config(["--config", str(yaml_file), "--train-data", "x"])
    assert check("--train-data", str(tmp_path / "none-{0..3}.tar")).exit_code == EXIT_USAGE


@pytest.mark.slow
def test_usage_error_is_one_line_and_debug_shows_the_traceback(clean_shards, tmp_path):
    bad_json = tmp_path / "model.json"
    bad_json.write_text("{\n  nope\n}")
    started = time.monotonic()
    result = launch_train(base(clean_shards.spec, tmp_path / "a", "--model", str(bad_json)), timeout=FAST)
    assert_one_error(result, EXIT_USAGE, r"model config .*model\.json: malformed JSON at line 2, column 3", started)
    debug = launch_train(base(clean_shards.spec, tmp_path / "a", "--model", str(bad_json), "--debug"), timeout=FAST)
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr and "JSONDecodeError" in debug.stderr


@pytest.mark.slow
def test_bad_flags_and_files_through_the_cli(clean_shards, tmp_path):
    """The command itself, one process: each bad flag or file is one `error:` line on stderr, its exit code, no
    traceback, fast, nothing left running (the in-process tests above cover each check's message)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "run.yaml").write_text("lr: 0.1\nbatch_size: [8\n")
    (tmp_path / "w.pt").write_bytes(b"<html>404</html>")
    cases = [
        (["--lr", "-1"], EXIT_USAGE, r"--lr must be a finite number > 0, got -1\.0"),
        (["--config", str(tmp_path / "run.yaml")], EXIT_USAGE, r"malformed YAML at line 3, column 1"),
        (["--output-dir", str(tmp_path / "afile")], EXIT_USAGE, r"exists and is not a directory"),
        (["--resume", str(tmp_path / "nope")], EXIT_CHECKPOINT, r"no such checkpoint directory"),
        (["--hf-text-model", str(tmp_path)], EXIT_USAGE, r"no Hugging Face config\.json"),
        (["--pretrained", str(tmp_path / "w.pt")], EXIT_USAGE, r"--pretrained .*w\.pt: not a readable weights file"),
    ]
    for flags, code, pattern in cases:
        started = time.monotonic()
        result = launch_train(base(clean_shards.spec, tmp_path / "out", *flags), timeout=FAST)
        assert_one_error(result, code, pattern, started)


# ------------------------------------------------------------------ data that cannot train: each rank stops alike
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2])
def test_batch_larger_than_the_data(clean_shards, tmp_path, nproc):
    """64 samples, batch 5000: before, epoch after epoch started at step 0 forever."""
    started = time.monotonic()
    result = launch_train(base(clean_shards.spec, tmp_path / "run", "--batch-size", "5000"), nproc=nproc,
                          timeout=FAST)
    world = max(nproc, 1)
    assert_one_error(result, EXIT_DATA, rf"epoch 0 yields no optimizer step: 64 good samples per epoch, fewer than "
                                        rf"one global batch of {5000 * world:,}", started, nproc)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2])
def test_shard_without_images(tmp_path, nproc):
    shard = txt_only_shard(tmp_path / "txt.tar")
    started = time.monotonic()
    result = launch_train(base(shard, tmp_path / "run"), nproc=nproc, timeout=FAST)
    assert_one_error(result, EXIT_DATA, r"epoch 0 yields no optimizer step: 0 of 300 samples usable "
                                        r"\(missing_image 300\)", started, nproc)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [0, 2])
def test_shard_without_images_resampled(tmp_path, nproc):
    """Resampled streams never end: a worker that reads 10,000 samples in a row without a batch stops the run."""
    shard = txt_only_shard(tmp_path / "txt.tar")
    started = time.monotonic()
    result = launch_train(base(shard, tmp_path / "run", "--resampled", "--train-num-samples", "1000"), nproc=nproc,
                          timeout=FAST)
    assert_one_error(result, EXIT_DATA, r"read 10,000 samples in a row without completing a batch .*missing_image",
                     started, nproc)
