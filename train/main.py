"""Train a CLIP model: `accelerate launch --config_file train/accelerate/cpu_zero2.yaml train/main.py --train-data ...`.

Thin entry point over clipkit.train; `python train/main.py --help` lists every flag (a YAML --config may set them too).
A user error (bad flag, file, data or checkpoint) prints one `error: ...` line on rank 0 and exits with its code
(clipkit/train/errors.py); `--debug` or CLIPKIT_DEBUG=1 adds the traceback.
"""

import logging
import os
import sys


def main(argv=None) -> int:
    from clipkit.train.config import parse_config
    from clipkit.train.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("CLIPKIT_DEBUG", "") not in ("", "0")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        from clipkit.train.loop import train

        summary = train(cfg)
    except UserError as e:
        if rank0:
            if debug:
                logging.getLogger("clipkit.train").exception("user error")
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if rank0:
        logging.getLogger("clipkit.train").info("done: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
