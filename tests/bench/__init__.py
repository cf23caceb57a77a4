"""Benchmarks (not tests): ``python -m tests.bench.run`` from the repo root.

Files here are named ``bench_*.py`` so pytest never collects them.
"""
