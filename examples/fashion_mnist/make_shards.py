"""Fashion-MNIST train split -> WebDataset shards of (png, txt) for `train/main.py`.

    python examples/fashion_mnist/make_shards.py --out runs/fmnist_shards
    # smoke-sized: --max-samples 2000
    # noisy captions for the filtering experiment (examples/fashion_mnist/filter_experiment.sh): 30% name a wrong class
    python examples/fashion_mnist/make_shards.py --out runs/fmnist_noisy --corrupt-fraction 0.3

Each image gets one caption made from its class name with a randomly chosen template and name variant, so the model
learns class names from language, not from label ids. Images stay 28x28 grayscale PNG (lossless); the training
transform resizes them. Shards: OUT/shard-000000.tar ...; prints the brace spec to pass as --train-data.
With --corrupt-fraction F, a random F of the captions name another class (uniformly among the other nine) and each
sample's json records {"label", "caption_label", "corrupted"}, so a filter's precision and recall can be measured.
"""

import argparse
import io
import json
import random
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clipkit.eval.fashion_mnist import FASHION_MNIST_CLASSNAMES, load_fashion_mnist  # noqa: E402

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# Name variants per class: the canonical name first (the one zero-shot eval uses), then common synonyms.
NAME_VARIANTS = {
    "t-shirt/top": ["t-shirt/top", "t-shirt", "top", "tee shirt"],
    "trouser": ["trouser", "pair of trousers", "pants"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress"],
    "coat": ["coat", "jacket"],
    "sandal": ["sandal", "summer sandal"],
    "shirt": ["shirt", "button-up shirt"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag"],
    "ankle boot": ["ankle boot", "boot"],
}
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a product photo of a {}.",
    "a grayscale picture of a {}.",
    "a small photo of a {}.",
    "{}",
)


def make_caption(classname: str, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(rng.choice(NAME_VARIANTS[classname]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="directory with the Fashion-MNIST idx(.gz) files")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--out", required=True, help="output directory for the .tar shards")
    parser.add_argument("--per-shard", type=int, default=10000)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-fraction", type=float, default=0.0,
                        help="fraction of captions that name a wrong class (json: corrupted=true)")
    args = parser.parse_args(argv)

    import webdataset as wds

    images, labels = load_fashion_mnist(args.root, args.split)
    n = len(labels) if args.max_samples is None else min(args.max_samples, len(labels))
    rng = random.Random(args.seed)
    order = list(range(len(labels)))
    rng.shuffle(order)  # shards then mix classes even when a loader reads them in order
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        sys.exit(f"{out} already holds shard-*.tar files: choose an empty --out")
    corrupt_rng = random.Random(args.seed + 1)  # separate stream: the clean captions stay those of a clean run
    corrupted = set(corrupt_rng.sample(range(n), round(args.corrupt_fraction * n))) if args.corrupt_fraction else set()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=args.per_shard, verbose=0) as sink:
        for position, i in enumerate(order[:n]):
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            label = int(labels[i])
            caption_label = label
            if position in corrupted:
                caption_label = corrupt_rng.choice([k for k in range(10) if k != label])
            sample = {"__key__": f"{args.split}{i:06d}", "png": buf.getvalue(),
                      "txt": make_caption(FASHION_MNIST_CLASSNAMES[caption_label], rng), "cls": str(label)}
            if args.corrupt_fraction:
                sample["json"] = json.dumps({"label": label, "caption_label": caption_label,
                                             "corrupted": position in corrupted}).encode()
            sink.write(sample)
    num_shards = len(list(out.glob("shard-*.tar")))
    last = num_shards - 1
    spec = str(out / (f"shard-{{000000..{last:06d}}}.tar" if last > 0 else "shard-000000.tar"))
    print(f"wrote {n} samples in {num_shards} shards; --train-data '{spec}' --train-num-samples {n}")


if __name__ == "__main__":
    main()
