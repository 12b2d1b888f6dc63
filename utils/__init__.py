"""Shared engine: checkpoints, results table, metrics, distributed set-up, training loop, CLI."""
