"""Checkpoint tools (tiny official-layout checkpoints, conversions), installed as `minidit.weights`."""
