"""raydc benchmarks: `python -m benchmarks.run --quick|--full [--only NAME] [--out DIR]` (see README.md)."""
