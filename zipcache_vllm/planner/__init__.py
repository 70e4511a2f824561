"""Capacity planning: bytes per token from the layout, and what fits where."""
