"""Quality control without ground truth: held-out-slice self-validation, registration QC, the fit's residual.

Pure functions (numpy/torch/nibabel, no Nipype); the Nipype wrappers are in :mod:`atlasgs_bids.interfaces.qc`.
"""
