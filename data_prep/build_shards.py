"""Build WebDataset shards from caption dumps. See `python data_prep/build_shards.py --help` and clipkit/data_prep/."""

import sys

from clipkit.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
