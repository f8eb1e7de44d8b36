"""Benchmarks, run from the checkout: ``python -m bench.bench_milter`` (the harness is not installed)."""
