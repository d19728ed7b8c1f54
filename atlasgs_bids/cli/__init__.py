"""Command line: ``atlasgs-bids bids_dir output_dir {participant,group} [options]``, ``atlasgs-bids demo OUT``,
``atlasgs-bids index BIDS_DIR DB_DIR``, ``atlasgs-bids bench ...``.

One module a job: :mod:`~atlasgs_bids.cli.parser` (argparse), :mod:`~atlasgs_bids.cli.logs` (console logging),
:mod:`~atlasgs_bids.cli.run` (participant and group levels), :mod:`~atlasgs_bids.cli.demo` (the demo and its
scoring), :mod:`~atlasgs_bids.cli.entry` (:func:`main`: dispatch and exit codes, see
:mod:`~atlasgs_bids.cli.codes`).
"""
from atlasgs_bids.cli.entry import main

__all__ = ["main"]
