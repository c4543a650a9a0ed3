"""Synthetic e-commerce workload for demos, tests and benchmarks."""
