"""T1w interfaces: reorientation to RAS+ and the brain mask (deepbet, precomputed, or ``T1w > 0``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from atlasgs_bids.errors import InputError

MASK_METHODS = ("deepbet", "precomputed", "skull_stripped")


def reorient_t1w(in_file: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Load and validate the T1w, reorient it to RAS+ (untouched when canonical), write ``out_file``."""
    from atlasgs_bids.imaging.nifti import load_nifti, save_nifti, to_canonical

    return save_nifti(to_canonical(load_nifti(in_file)), out_file)


def mask_on_grid(mask_img: nib.spatialimages.SpatialImage, t1w_img: nib.spatialimages.SpatialImage,
                 source: str) -> nib.Nifti1Image:
    """A precomputed mask, reoriented to RAS+, checked to lie on the (RAS+) T1w grid; uint8 0/1.

    Raises :class:`InputError` naming ``source`` when its grid differs from the T1w's (shape, or affine by more
    than 1e-3 mm).
    """
    from atlasgs_bids.imaging.nifti import to_canonical

    mask_img = to_canonical(mask_img)
    if mask_img.shape[:3] != t1w_img.shape[:3] or not np.allclose(mask_img.affine, t1w_img.affine, atol=1e-3):
        raise InputError(f"{source}: this brain mask is not on the T1w's grid (shape {mask_img.shape[:3]} vs "
                         f"{t1w_img.shape[:3]}); give a mask in the T1w's space (space-T1w or no space entity)")
    data = (np.asarray(mask_img.dataobj)[..., 0] if mask_img.ndim == 4 else np.asarray(mask_img.dataobj)) > 0
    return nib.Nifti1Image(data.astype(np.uint8), t1w_img.affine)


def make_brain_mask(t1w_file: str | os.PathLike, out_file: str | os.PathLike, *, method: str = "deepbet",
                    mask_file: str | os.PathLike | None = None, device: str = "cpu") -> Path:
    """Brain mask (uint8 0/1) on the grid of the (RAS+) T1w in ``t1w_file``.

    Parameters
    ----------
    method : {'deepbet', 'precomputed', 'skull_stripped'}
        ``deepbet``: :func:`atlasgs_bids.imaging.brainmask.brain_mask` (offline weights); ``precomputed``: the mask
        in ``mask_file`` (from ``--derivatives``); ``skull_stripped``: ``T1w > 0``.
    """
    from atlasgs_bids.imaging.nifti import on_grid_of, save_nifti

    t1w_img = nib.load(str(t1w_file))
    if method == "skull_stripped":
        data = np.asarray(t1w_img.dataobj) > 0
        if not data.any():
            raise InputError(f"{t1w_file}: --skull-stripped but the T1w has no voxel > 0")
        mask = nib.Nifti1Image(data.astype(np.uint8), t1w_img.affine)
    elif method == "precomputed":
        if not mask_file:
            raise ValueError("method 'precomputed' needs mask_file")
        mask = mask_on_grid(nib.load(str(mask_file)), t1w_img, str(mask_file))
    elif method == "deepbet":
        from atlasgs_bids.imaging.brainmask import brain_mask

        mask = brain_mask(t1w_img, device=device)
    else:
        raise ValueError(f"unknown mask method {method!r}; use one of {MASK_METHODS}")
    # the T1w's header codes and mm units, whichever way the mask was made
    return save_nifti(on_grid_of((np.asarray(mask.dataobj) > 0).astype(np.uint8), t1w_img), out_file)


class _ReorientInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w NIfTI as found in the BIDS dataset")


class _ReorientOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="T1w reoriented to RAS+ (the reference grid of every output)")
    seconds = traits.Float(desc="wall-clock seconds")


class Reorient(SimpleInterface):
    """Reorient the T1w to RAS+ (:func:`reorient_t1w`)."""

    input_spec = _ReorientInputSpec
    output_spec = _ReorientOutputSpec

    def _run_interface(self, runtime):
        t0 = time.perf_counter()
        out = Path(runtime.cwd) / "t1w_ras.nii.gz"
        self._results["out_file"] = str(reorient_t1w(self.inputs.in_file, out))
        self._results["seconds"] = time.perf_counter() - t0
        return runtime


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="RAS+ T1w")
    method = traits.Enum(*MASK_METHODS, usedefault=True, desc="how the mask is made")
    mask_file = File(exists=True, desc="precomputed mask (method 'precomputed')")
    device = traits.Enum("cpu", "cuda", usedefault=True, desc="deepbet device")


class _BrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="brain mask, uint8 0/1, on the T1w grid")
    seconds = traits.Float(desc="wall-clock seconds")


class BrainMask(SimpleInterface):
    """Brain mask of the T1w (:func:`make_brain_mask`)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        t0 = time.perf_counter()
        out = Path(runtime.cwd) / "brain_mask.nii.gz"
        mask_file = self.inputs.mask_file if self.inputs.mask_file else None
        self._results["out_file"] = str(make_brain_mask(self.inputs.in_file, out, method=self.inputs.method,
                                                        mask_file=mask_file, device=self.inputs.device))
        self._results["seconds"] = time.perf_counter() - t0
        return runtime
