"""Export of fastsample networks for deployment (installed as fastsample.export)."""
