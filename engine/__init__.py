"""Training engine: the training loop, run lifecycle, run description, metrics, distillation, flags, comparison."""
