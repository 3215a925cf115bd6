"""Training: config, loop, checkpoints, optimizer (entry point: train/main.py)."""
