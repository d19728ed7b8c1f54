"""Sample data for ``atlasgs-bids demo``: a small BIDS dataset with ground truth, built offline."""
from atlasgs_bids.data.sample import SampleInfo, build_sample_dataset

__all__ = ["SampleInfo", "build_sample_dataset"]
