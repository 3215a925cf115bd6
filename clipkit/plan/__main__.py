"""`python -m clipkit.plan ...`: see clipkit/plan/cli.py."""

import sys

from clipkit.plan.cli import main

sys.exit(main())
