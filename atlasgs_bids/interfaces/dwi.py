"""DWI interface: b-vectors rotated into the voxel frame of the output (T1w) grid."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec


def rotate_bvec_file(bvec_file: str | os.PathLike, target_file: str | os.PathLike, xfm_file: str | os.PathLike,
                     t1w_file: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the ``.bvec`` of the harmonised dwi: rows (3, V) rotated from the source voxel frame to the T1w's.

    ``xfm_file`` resamples the target onto the T1w (T1w -> target RAS), so ``target2t1w`` is its inverse.
    """
    from atlasgs_bids.imaging.bvecs import rotate_bvecs
    from atlasgs_bids.imaging.transforms import read_target2t1w

    bvecs = np.loadtxt(bvec_file, ndmin=2)
    target2t1w = read_target2t1w(xfm_file)
    out = rotate_bvecs(bvecs, nib.load(str(target_file)).affine, target2t1w, nib.load(str(t1w_file)).affine)
    out_file = Path(out_file)
    np.savetxt(out_file, np.asarray(out), fmt="%.6f")
    return out_file


class _RotateInputSpec(BaseInterfaceInputSpec):
    bvec_file = File(exists=True, mandatory=True, desc="source .bvec (3 rows)")
    target_file = File(exists=True, mandatory=True, desc="source dwi NIfTI (its affine)")
    xfm_file = File(exists=True, mandatory=True, desc="ITK transform resampling the dwi onto the T1w")
    t1w_file = File(exists=True, mandatory=True, desc="RAS+ T1w (output grid)")


class _RotateOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="rotated .bvec")


class RotateBvecs(SimpleInterface):
    """Rotate b-vectors into the output frame (:func:`rotate_bvec_file`)."""

    input_spec = _RotateInputSpec
    output_spec = _RotateOutputSpec

    def _run_interface(self, runtime):
        out = Path(runtime.cwd) / "dwi.bvec"
        self._results["out_file"] = str(rotate_bvec_file(self.inputs.bvec_file, self.inputs.target_file,
                                                         self.inputs.xfm_file, self.inputs.t1w_file, out))
        return runtime
