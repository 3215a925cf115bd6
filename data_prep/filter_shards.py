"""Filter WebDataset shards by CLIP score and DataComp's rules. See `python data_prep/filter_shards.py --help` and
clipkit/data_prep/filter/."""

import sys

from clipkit.data_prep.filter.cli import main

if __name__ == "__main__":
    sys.exit(main())
