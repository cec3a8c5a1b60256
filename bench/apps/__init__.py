"""Servers under test: the baselines and the tidewire app used by W2."""
