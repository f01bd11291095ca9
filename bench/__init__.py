"""Benchmarks (not timed tests): overhead against direct access and peers, routing."""
