"""Exports the momentum (EMA) model held in a training checkpoint as an open_clip model dir, after the fact: what
`--export-momentum` would have written to final/, for a run trained without that flag.

    python examples/recipe/export_momentum.py runs/arms_fmnist/queue4096 runs/arms_fmnist/queue4096/final_momentum

RUN is a run dir (its latest complete checkpoint and its final/ config are used). The result loads with
`clipkit.models.load_open_clip` or `open_clip.create_model_and_transforms("local-dir:OUT")` like any final/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from clipkit.models import OPEN_CLIP_CONFIG, export_open_clip
from clipkit.train import checkpoint as ckpt
from clipkit.train.recipe import STATE_FILE, exportable, state_part


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    latest = ckpt.latest_complete(a.run)
    if latest is None:
        sys.exit(f"{a.run}: no complete checkpoint under checkpoints/")
    state = load_file(str(latest / STATE_FILE)) if (latest / STATE_FILE).is_file() else {}
    weights = state_part(state, "momentum")
    if not weights:
        sys.exit(f"{latest}: no momentum model (the run had no --queue-size / --distill-alpha with --momentum > 0)")
    cfg = json.loads((a.run / "final" / OPEN_CLIP_CONFIG).read_text())
    export_open_clip(exportable(weights), cfg["model_cfg"], cfg["preprocess_cfg"], a.out)
    print(f"momentum model of {latest} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
