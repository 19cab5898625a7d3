"""DreamBench evaluation harness (issue 27): metrics (metrics.py, vit.py), cases and methods (cases.py, world.py),
the sharded, resumable run (runner.py) and its report (report.py). `python -m minidit.eval --help`."""
