"""``python -m atlasgs_bids.cli ARGS``, the same as the ``atlasgs-bids`` console script."""
import sys

from atlasgs_bids.cli.entry import main

sys.exit(main())
