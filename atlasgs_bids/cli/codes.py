"""Exit codes of ``atlasgs-bids``: 0 success; 1 processing failure; 2 usage or input error (argparse's code)."""

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
