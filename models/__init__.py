"""Models: timm factory with width multipliers, and cost statistics."""
