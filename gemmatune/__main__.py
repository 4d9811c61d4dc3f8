"""`python -m gemmatune ...`: the command line (gemmatune/cli.py)."""
import sys

from gemmatune.cli import main

if __name__ == "__main__":
    sys.exit(main())
