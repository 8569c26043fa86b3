"""Sandboxes: one VM and its agent, the unit that containers run in."""

