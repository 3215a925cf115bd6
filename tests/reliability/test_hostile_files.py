"""Properties 8 and 10 of the reliability suite (issue 5): hostile tar members and hostile pickles.

8. clipkit never extracts a tar to disk: shards are read member by member into memory (training loader, sample
   counting, eval `wds:`; data prep only re-reads the tars it wrote). Members named `../x` or `/abs/x`, symlinks and
   hardlinks are ignored by every reader, and nothing is created outside (or inside) the shard's folder.
10. A checkpoint file whose pickle carries a `__reduce__` payload is refused by `--resume` (one process) and by the
   checkpoint guard (ZeRO-2 files), by training's and eval's `--pretrained`, and the payload never runs; a source
   scan bans unsafe loaders (torch.load without weights_only=True, pickle, yaml.load, ...).
"""

import ast
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clipkit.data import build_train_loader
from clipkit.eval.datasets import build_dataset
from clipkit.models import create_model
from clipkit.train import checkpoint as ckpt
from tests._shards import jpeg_bytes
from tests._train import REPO
from tests.reliability._helpers import launch, launch_train

# ------------------------------------------------------------------------------------------------ 8: tar members


def _hostile_tar(path: Path, outside: Path, rng) -> None:
    """Two good samples around members that try to escape: `../`, an absolute path, a symlink and a hardlink to a
    secret outside, each with a caption so that a reader that accepts them would yield a sample."""
    secret = outside / "secret.jpg"

    def regular(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def link(tar, name, target, kind):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        tar.addfile(info)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        regular(tar, "good0.jpg", jpeg_bytes(rng, 32))
        regular(tar, "good0.txt", b"a good sample")
        regular(tar, "../escape.jpg", jpeg_bytes(rng, 32))
        regular(tar, "../escape.txt", b"parent")
        regular(tar, "sub/../../escape2.jpg", jpeg_bytes(rng, 32))
        regular(tar, "sub/../../escape2.txt", b"parent via sub")
        regular(tar, f"{outside}/abs.jpg", jpeg_bytes(rng, 32))
        regular(tar, f"{outside}/abs.txt", b"absolute")
        link(tar, "symlink.jpg", str(secret), tarfile.SYMTYPE)
        regular(tar, "symlink.txt", b"symlink")
        link(tar, "hardlink.jpg", str(secret), tarfile.LNKTYPE)
        regular(tar, "hardlink.txt", b"hardlink")
        link(tar, "inside.jpg", "good0.jpg", tarfile.LNKTYPE)  # a hardlink to a member: still not a regular file
        regular(tar, "inside.txt", b"inside link")
        regular(tar, "good1.jpg", jpeg_bytes(rng, 32))
        regular(tar, "good1.txt", b"another good sample")


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def test_hostile_tar_members_are_ignored_and_nothing_is_written(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    outside, data, cwd = tmp_path / "outside", tmp_path / "data" / "test", tmp_path / "cwd" / "deep"
    for d in (outside, data, cwd):
        d.mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(jpeg_bytes(rng, 32))
    shard = data / "0.tar"
    _hostile_tar(shard, outside, rng)
    monkeypatch.chdir(cwd)  # relative escapes would land in tmp_path/cwd or tmp_path
    before = _tree(tmp_path)

    # training loader
    batches = list(build_train_loader(str(shard), lambda im: torch.zeros(1), lambda t: t, batch_size=1,
                                      num_workers=0, shuffle_buffer=0))
    assert [b["keys"][0] for b in batches] == ["good0", "good1"]
    assert [b["text"][0] for b in batches] == ["a good sample", "another good sample"]
    # eval `wds:` (CLIP_benchmark layout: DIR/test/0.tar)
    dataset = build_dataset(f"wds:{tmp_path / 'data'}")
    got = [c for batch in dataset.loader(lambda im: torch.zeros(1), batch_size=8) for c in batch.captions]
    assert got == [["a good sample"], ["another good sample"]]

    assert _tree(tmp_path) == before  # nothing created, removed or resized anywhere under the test's folder
    for name in ("escape.jpg", "escape2.jpg", "abs.jpg"):
        assert not list(tmp_path.rglob(name))


def test_no_reader_extracts_tars_to_disk():
    """Extraction APIs write member names to the filesystem; clipkit reads members into memory only."""
    banned = ("extractall", "extract(", "_extract_member", "makefile(", "makelink(")
    hits = [f"{path}:{i}" for path in _sources() for i, line in enumerate(path.read_text().splitlines(), 1)
            if any(b in line for b in banned) and "extractfile(" not in line]
    assert hits == []


# ------------------------------------------------------------------------------------------------ 10: pickles
class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _torch_payload(path: Path, marker: Path) -> Path:
    torch.save({"state": {"exp_avg": torch.zeros(2)}, "hook": _Payload(marker)}, path)
    return path


def _pickle_payload(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps([np.zeros(2), _Payload(marker)]))
    return path


@pytest.mark.parametrize("make", [_torch_payload, _pickle_payload])
def test_payloads_are_live(tmp_path, make):
    """The positive control: an unsafe load of the same kind of file runs the payload (ours: it makes a folder), so a
    missing marker elsewhere means "refused", not "the payload was a dud"."""
    marker = tmp_path / "control"
    try:
        torch.load(make(tmp_path / "payload.bin", marker), weights_only=False)  # as accelerate and DeepSpeed load
    except RuntimeError:
        pass  # a plain pickle is no torch file, but torch finds out only after unpickling its first object
    assert marker.is_dir()


def _one_process_args(shards, out, steps):
    return ["--model", "clipkit-tiny", "--train-data", shards.spec, "--batch-size", "8", "--steps", str(steps),
            "--workers", "0", "--shuffle-buffer", "0", "--output-dir", str(out), "--no-progress", "--no-tensorboard"]


@pytest.mark.slow
def test_resume_refuses_a_poisoned_checkpoint(clean_shards, one_process_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_process_run, run)
    step = run / "checkpoints" / "step_00000002"
    ckpt.verify_pickles(step)  # the genuine checkpoint passes
    marker = tmp_path / "pwned"
    # the RNG states (a plain pickle accelerate loads with weights_only=False) are refused by the guard ...
    real_rng = (step / "random_states_0.pkl").read_bytes()
    _pickle_payload(step / "random_states_0.pkl", marker)
    with pytest.raises(ckpt.CheckpointError, match="random_states_0.pkl does not load with weights_only=True"):
        ckpt.verify_pickles(step)
    (step / "random_states_0.pkl").write_bytes(real_rng)
    # ... and end to end, `--resume auto` refuses a poisoned optimizer state before anything unpickles it
    _torch_payload(step / "optimizer.bin", marker)
    metrics = (run / "metrics.jsonl").read_text()
    result = launch_train(_one_process_args(clean_shards, run, 3) + ["--resume", "auto"])
    assert result.returncode != 0, result.explain()
    assert f"refusing checkpoint {step}: optimizer.bin does not load with weights_only=True" in result.stderr
    assert not marker.exists()
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing was trained


@pytest.mark.slow
def test_zero2_checkpoint_guard_accepts_real_files_and_refuses_a_poisoned_shard(reference_run, tmp_path):
    saved = reference_run / "checkpoints" / "step_00000008"
    ckpt.verify_pickles(saved)  # the allowlist admits everything DeepSpeed and accelerate really write
    copy = tmp_path / "step_00000008"
    shutil.copytree(saved, copy)
    shard = copy / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    _torch_payload(shard, marker)
    with pytest.raises(ckpt.CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt does not load"):
        ckpt.verify_pickles(copy)
    assert not marker.exists()


@pytest.mark.slow
def test_every_pickle_a_checkpoint_holds_is_checked(one_process_run, reference_run):
    """verify_pickles picks files by suffix: every file in real checkpoints that is a pickle (zip or protocol 2+)
    must carry one of those suffixes, or a poisoned copy of it would be loaded unchecked."""
    checked = []
    for run in (one_process_run, reference_run):
        for f in sorted((Path(run) / "checkpoints").rglob("*")):
            if f.is_file() and _is_pickle(f):
                assert f.suffix in ckpt._PICKLE_SUFFIXES, f
                checked.append(f.name)
    assert {"optimizer.bin", "random_states_0.pkl", "mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(checked)


def _is_pickle(path: Path) -> bool:
    """A torch zip archive, or a pickle of protocol 2-5, and not a safetensors file (whose 8-byte little-endian
    header length may start with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    data = path.read_bytes()
    if len(data) < 2 or data[0] != 0x80 or data[1] not in range(2, 6):
        return False
    n = int.from_bytes(data[:8], "little")
    try:
        json.loads(data[8:8 + n])
        return False  # a safetensors header
    except ValueError:
        return True


@pytest.mark.slow
def test_pretrained_weights_refuse_a_payload_in_training_and_eval(tmp_path):
    marker = tmp_path / "pwned"
    evil = _torch_payload(tmp_path / "evil.pt", marker)
    # training's --pretrained and eval's both end in clipkit.models.create_model(pretrained=FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        create_model("clipkit-tiny", pretrained=str(evil))
    assert not marker.exists()

    classes = tmp_path / "folder"
    for i, name in enumerate(("cat", "dog")):
        (classes / name).mkdir(parents=True)
        (classes / name / "0.jpg").write_bytes(jpeg_bytes(np.random.default_rng(i), 32))
    evaluation = launch([sys.executable, str(REPO / "eval" / "zeroshot.py"), "--model", "clipkit-tiny", "--pretrained",
                         str(evil), "--dataset", f"folder:{classes}", "--workers", "0", "--no-progress"], timeout=300)
    assert evaluation.returncode != 0 and "Weights only load failed" in evaluation.stderr, evaluation.explain()
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ 10: source scan
SCANNED = ("clipkit", "train", "eval", "data_prep", "bench")
# path (relative to the repo) -> why an unsafe-looking call there is fine. Keep it short.
ALLOWLIST: dict = {}


def _sources():
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unsafe_loads(source: str) -> list:
    """(line, call) of every call that can run code from a file: torch.load without weights_only=True, pickle /
    dill / joblib / marshal loads, yaml.load / unsafe_load / full_load, np.load(allow_pickle=True), torch.jit.load.
    Imports of pickle's loaders under another name are caught too (`from pickle import load`)."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        name = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        bad = (
            (name == "torch.load" and _keyword(node, "weights_only") is not True)
            or name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
                        "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "joblib.load", "marshal.load",
                        "marshal.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                        "yaml.unsafe_load_all", "torch.jit.load", "shelve.open")
            or (name in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is True)
        )
        if bad:
            found.append((node.lineno, name))
    return found


def test_scanner_catches_unsafe_calls():
    code = """
import torch, pickle, yaml
import numpy as np
from pickle import loads as l
torch.load(f)
torch.load(f, weights_only=False)
torch.load(f, map_location="cpu", weights_only=True)
pickle.load(f)
l(b"")
yaml.load(s, Loader=yaml.Loader)
yaml.safe_load(s)
np.load(f, allow_pickle=True)
np.load(f)
"""
    assert [line for line, _ in unsafe_loads(code)] == [5, 6, 8, 9, 10, 12]


def test_no_unsafe_deserialisation_in_the_sources():
    hits = []
    for path in _sources():
        rel = str(path.relative_to(REPO))
        for line, name in unsafe_loads(path.read_text()):
            if rel not in ALLOWLIST:
                hits.append(f"{rel}:{line}: {name}")
    assert len(list(_sources())) > 40
    assert hits == [], "unsafe deserialisation (use weights_only=True, safetensors, json or yaml.safe_load):\n" + (
        "\n".join(hits))
