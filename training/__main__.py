"""`python -m training`: the training command line (training/cli.py)."""

from training.cli import main

raise SystemExit(main())
