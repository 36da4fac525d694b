"""Benchmarks and the model zoo (``benchmarks.zoo``); run each module as a script."""
