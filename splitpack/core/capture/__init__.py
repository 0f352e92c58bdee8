"""Capture: the model as an fx graph, its node kinds and checkpoints, and the per-op split rules."""
