"""The 3D reference volume of a target, the image registered to the T1w.

A 3D target is its own reference; a DWI series uses the mean of its b=0 volumes and an ASL series the mean of
its M0 scans (or, without M0, of its control volumes): those have the most anatomical contrast and signal.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from atlasgs_bids.errors import InputError

#: Volumes with a b-value up to this (s/mm^2) count as b=0 (scanners write small non-zero values, e.g. 5).
B0_THRESHOLD = 50.0


def _label(source: str | None, modality: str) -> str:
    return f"{source}" if source else f"{modality} series"


def reference_volume(
    data: np.ndarray,
    *,
    modality: str,
    bvals: Sequence[float] | np.ndarray | None = None,
    aslcontext: Sequence[str] | None = None,
    source: str | None = None,
) -> np.ndarray:
    """Reduce a target to the 3D volume used for registration.

    Parameters
    ----------
    data : array, shape (I, J, K) or (I, J, K, V)
        The target in its own voxel grid.
    modality : str
        BIDS suffix: ``"dwi"``, ``"asl"`` or an anatomical one (``"T2w"``, ``"FLAIR"``, ...); case-insensitive.
    bvals : sequence of V floats, optional
        b-values in s/mm^2 (required for a 4D ``dwi``); volumes with ``b <= 50`` are averaged.
    aslcontext : sequence of V str, optional
        The ``volume_type`` column of ``*_aslcontext.tsv`` (required for a 4D ``asl``): the ``m0scan``
        volumes are averaged when present, otherwise the ``control`` volumes.
    source : str, optional
        File name used in error messages.

    Returns
    -------
    array, shape (I, J, K)
        ``data`` itself when 3D; the single volume of a 4D with V = 1; otherwise the mean of the selected
        volumes as float32 (accumulated in float64).

    Raises
    ------
    InputError
        A 4D anatomical image with several volumes, missing or mismatched ``bvals`` / ``aslcontext``, no b=0
        volume, no M0 nor control volume, or data that is not 3D/4D.
    """
    data = np.asarray(data)
    kind = modality.lower()
    name = _label(source, modality)
    if data.ndim == 3:
        return data
    if data.ndim != 4:
        raise InputError(f"{name}: expected a 3D or 4D image, got shape {data.shape}")
    n_vols = data.shape[3]

    if kind == "dwi":
        if bvals is None:
            raise InputError(f"{name}: a 4D DWI series needs its b-values (.bval file) to find the b=0 volumes")
        b = np.asarray(bvals, dtype=np.float64).ravel()
        if b.size != n_vols:
            raise InputError(f"{name}: {b.size} b-values for {n_vols} volumes; the .bval file does not match the image")
        selected = np.flatnonzero(b <= B0_THRESHOLD)
        if selected.size == 0:
            raise InputError(
                f"{name}: no b=0 volume (b <= {B0_THRESHOLD:g} s/mm^2) among b-values {sorted(set(b.tolist()))}; "
                "a b=0 volume is needed as the registration reference"
            )
    elif kind == "asl":
        if aslcontext is None:
            raise InputError(f"{name}: a 4D ASL series needs its aslcontext.tsv to find M0 or control volumes")
        labels = [str(v).strip().lower() for v in aslcontext]
        if len(labels) != n_vols:
            raise InputError(f"{name}: aslcontext.tsv lists {len(labels)} volumes but the image has {n_vols}")
        selected = np.flatnonzero([v == "m0scan" for v in labels])
        if selected.size == 0:
            selected = np.flatnonzero([v == "control" for v in labels])
        if selected.size == 0:
            raise InputError(
                f"{name}: aslcontext.tsv has neither 'm0scan' nor 'control' volumes ({sorted(set(labels))}); "
                "one of them is needed as the registration reference"
            )
    else:
        if n_vols == 1:
            return data[..., 0]
        raise InputError(f"{name}: a {modality} image should be 3D but has {n_vols} volumes {data.shape}")

    return data[..., selected].mean(axis=3, dtype=np.float64).astype(np.float32)


def read_aslcontext(path: str | os.PathLike) -> list[str]:
    """The ``volume_type`` column of an ``_aslcontext.tsv`` (one entry per volume)."""
    with open(path, newline="") as fh:
        return [row["volume_type"] for row in csv.DictReader(fh, delimiter="\t")]


def reference_array(data: np.ndarray, *, modality: str, bval_file: str | os.PathLike | None = None,
                    aslcontext_file: str | os.PathLike | None = None,
                    source: str | os.PathLike | None = None) -> np.ndarray:
    """:func:`reference_volume` of a target's ``data`` (its own grid, 3D or 4D), with the b-values and the ASL
    context read from the target's ``.bval`` and ``_aslcontext.tsv``; float32 (I, J, K)."""
    bvals = np.loadtxt(bval_file, ndmin=1) if bval_file else None
    context = read_aslcontext(aslcontext_file) if aslcontext_file else None
    return np.asarray(reference_volume(data, modality=modality, bvals=bvals, aslcontext=context,
                                       source=str(source) if source else None), dtype=np.float32)
