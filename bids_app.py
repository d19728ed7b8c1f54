#!/usr/bin/env python
"""BIDS-Apps shim: ``python bids_app.py bids_dir output_dir {participant,group} [options]`` = ``atlasgs-bids ...``."""
import sys

from atlasgs_bids.cli import main

if __name__ == "__main__":
    sys.exit(main())
