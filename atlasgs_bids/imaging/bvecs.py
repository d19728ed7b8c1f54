"""Diffusion gradient directions (b-vectors) carried from the source DWI grid to the output grid.

Convention (BIDS = FSL): a ``.bvec`` file holds unit vectors in the *voxel* frame of its image, with the axes
scaled to mm (so only the axis directions matter, not the voxel sizes), and with the first axis flipped when
the image's voxel-to-world affine has a positive determinant (FSL's "radiological" internal frame). In
matrix form, with ``D = A[:3, :3] @ diag(1 / zooms)`` (the affine's unit axis directions) and
``F = diag(-1, 1, 1)`` if ``det(A) > 0`` else ``I``::

    world direction = D @ F @ bvec                              (mm RAS, unit)

:func:`rotate_bvecs` applies this on the source side and its inverse on the output side, so the result is a
valid BIDS/FSL ``.bvec`` for the output image.
"""
from __future__ import annotations

import numpy as np

from atlasgs_bids.errors import InputError

#: Vectors shorter than this are b=0 placeholders and stay exactly zero.
ZERO_NORM = 1e-6


def _orthogonal_part(m: np.ndarray) -> np.ndarray:
    """Closest orthogonal matrix to ``m`` (3, 3) (polar decomposition ``U @ Vt``); keeps a reflection."""
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def voxel_axes_to_world(affine: np.ndarray) -> np.ndarray:
    """(3, 3) orthogonal matrix taking a direction in the image's mm-scaled voxel axes to world RAS.

    Columns of ``affine[:3, :3]`` divided by the voxel sizes (their norms); for a sheared affine, the closest
    orthogonal matrix to that. Its determinant is the sign of ``det(affine[:3, :3])``.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    zooms = np.linalg.norm(a, axis=0)
    if np.any(zooms <= 0) or not np.all(np.isfinite(a)):
        raise ValueError("affine has a zero or non-finite voxel axis")
    return _orthogonal_part(a / zooms)


def fsl_flip(affine: np.ndarray) -> np.ndarray:
    """``diag(-1, 1, 1)`` when ``det(affine[:3, :3]) > 0`` (FSL flips the first axis of such images), else ``I``."""
    flip = np.eye(3)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        flip[0, 0] = -1.0
    return flip


def rotate_bvecs(
    bvecs: np.ndarray,
    source_affine: np.ndarray,
    target2t1w: np.ndarray,
    output_affine: np.ndarray,
) -> np.ndarray:
    """Rotate BIDS b-vectors from the source DWI's voxel frame into the output image's voxel frame.

    ``out = F_out @ D_out^T @ R @ D_src @ F_src @ bvec``, where ``D`` and ``F`` are as in the module docstring
    (:func:`voxel_axes_to_world`, :func:`fsl_flip`) for each image, and ``R`` is the rotation part of
    ``target2t1w`` (closest orthogonal matrix to its 3x3 block; translations do not act on directions).
    Non-zero vectors are renormalised to unit length; zero vectors (b=0) stay zero.

    Parameters
    ----------
    bvecs : array, shape (3, V)
        The ``.bvec`` rows as read (BIDS/FSL convention relative to the source image).
    source_affine : (4, 4) array
        Source DWI voxel index -> source world mm RAS.
    target2t1w : (4, 4) array
        Source (target) world mm RAS -> T1w world mm RAS (rigid).
    output_affine : (4, 4) array
        Output image voxel index -> T1w world mm RAS (the grid the harmonized DWI is written on).

    Returns
    -------
    array, shape (3, V) float64
        B-vectors in BIDS/FSL convention relative to the output image.

    Examples
    --------
    A 90 degree rotation about z takes world +x to world +y. In LAS images (det < 0, so no FSL flip) world
    +x is voxel -i and world +y is voxel +j:

    >>> las = np.diag([-2.0, 2.0, 2.0, 1.0])
    >>> rz = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    >>> np.round(rotate_bvecs(np.array([[-1.0], [0.0], [0.0]]), las, rz, las).ravel(), 6) + 0.0
    array([0., 1., 0.])
    """
    b = np.asarray(bvecs, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != 3:
        hint = " (transpose it: rows are x, y, z)" if b.ndim == 2 and b.shape[1] == 3 else ""
        raise InputError(f"b-vectors must have shape (3, V), got {b.shape}{hint}")
    if not np.all(np.isfinite(b)):
        raise InputError("b-vectors contain NaN or infinite values")
    for name, m in (("source_affine", source_affine), ("target2t1w", target2t1w), ("output_affine", output_affine)):
        m = np.asarray(m, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-8:
            raise ValueError(f"{name} must be a finite, non-singular (4, 4) matrix")

    to_world = voxel_axes_to_world(source_affine) @ fsl_flip(source_affine)
    rotation = _orthogonal_part(np.asarray(target2t1w, dtype=np.float64)[:3, :3])
    to_output = fsl_flip(output_affine) @ voxel_axes_to_world(output_affine).T
    out = to_output @ rotation @ to_world @ b

    norms = np.linalg.norm(b, axis=0)
    nonzero = norms > ZERO_NORM
    out_norms = np.linalg.norm(out, axis=0)
    out[:, nonzero] /= out_norms[nonzero]
    out[:, ~nonzero] = 0.0
    return out
