"""fastsample benchmarks (not installed): python -m bench.<name>."""
