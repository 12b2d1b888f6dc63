"""Models: timm factory with width multipliers, offline-safe weights, cost statistics, pruning, quantisation."""
