"""Train a CLIP model: `accelerate launch --config_file train/accelerate/cpu_zero2.yaml train/main.py --train-data ...`.

Thin entry point over clipkit.train; `python train/main.py --help` lists every flag (a YAML --config may set them too).
"""

import logging
import os
import sys

from clipkit.train.config import parse_config
from clipkit.train.loop import TrainingStopped, train


def main(argv=None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = train(cfg)
    except TrainingStopped as e:
        logging.getLogger("clipkit.train").error("training stopped: %s", e)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("clipkit.train").info("done: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
