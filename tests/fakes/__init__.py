"""Verified test doubles; each module says what it stands for."""
