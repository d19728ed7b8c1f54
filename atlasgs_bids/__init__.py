"""atlasgs-bids: thick-slice brain MRI to the T1w's resolution through a 3D Gaussian scaffold."""
from atlasgs_bids.version import __version__

__all__ = ["__version__"]
