"""Fake kernels package."""
