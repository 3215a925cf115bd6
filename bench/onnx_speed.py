"""Which runs the encoders faster on CPU: torch or onnxruntime (the `serve/app.py --onnx` backend)?

    python bench/onnx_speed.py --model demo_out/run          # default: clipkit-tiny with random weights
    # smoke-sized: --repeats 3

Times `TorchEncoder.encode` and `OnnxEncoder.encode` (the service's two backends, same inputs) for batches of 1 and
32 texts and images, median of --repeats, and prints the ratio. Both use this machine's threads.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    from clipkit.eval.models import load_model
    from clipkit.index.fingerprint import model_config_of, model_fingerprint
    from clipkit.models import create_model, export_open_clip, preprocess_cfg_of
    from clipkit.serve.encoders import OnnxEncoder, TorchEncoder
    from clipkit.serve.onnx_export import export_onnx, image_size_of

    tmp = Path(tempfile.mkdtemp(prefix="clipkit_onnx_speed_"))
    model = args.model
    if model is None:
        torch.manual_seed(0)
        net, cfg, _, _, _ = create_model("clipkit-tiny")
        model = str(export_open_clip(net.state_dict(), cfg, preprocess_cfg_of(net), tmp / "model"))
    loaded = load_model(model)
    fp, dim = model_fingerprint(loaded), int(model_config_of(loaded)["embed_dim"])
    export_onnx(loaded, fp, dim, tmp / "onnx")
    backends = {"torch": TorchEncoder(loaded.model, loaded.tokenizer, loaded.preprocess, fp, loaded.name, dim),
                "onnxruntime": OnnxEncoder(tmp / "onnx", loaded.tokenizer, loaded.preprocess, fp, loaded.name, dim)}
    h, w = image_size_of(loaded.model)
    print(f"model {loaded.name}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for kind in ("text", "image"):
        for n in (1, 32):
            items = ([f"a photo of a red star number {i}" for i in range(n)] if kind == "text"
                     else list(torch.randn(n, 3, h, w)))
            ms = {}
            for name, enc in backends.items():
                enc.encode(kind, items)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    enc.encode(kind, items)
                    times.append(1000 * (time.perf_counter() - t0))
                ms[name] = statistics.median(times)
            print(f"{kind:<5} batch {n:<3} torch {ms['torch']:8.2f} ms   onnxruntime {ms['onnxruntime']:8.2f} ms   "
                  f"torch / onnxruntime {ms['torch'] / ms['onnxruntime']:5.2f}x")


if __name__ == "__main__":
    main()
