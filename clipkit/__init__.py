"""clipkit: CLIP-style image-text contrastive pretraining.

Importing the package has no side effects: no argument parsing, logging set-up, env reads or heavy optional imports.
"""

__version__ = "0.1.0"
