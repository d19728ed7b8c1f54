"""Linear transforms between the app's RAS world (mm) and ITK/ANTs files (LPS world, mm).

Frames
------
The app (nibabel, the Gaussian field) works in **RAS+ world mm**: x grows to the subject's Right, y to Anterior,
z to Superior. ITK and ANTs store physical points in **LPS+ world mm** (x to Left, y to Posterior). The same
physical point has ``p_lps = F @ p_ras`` with ``F = diag(-1, -1, 1)``, so a linear map ``M`` acting on points
converts by conjugation, ``M_lps = F4 @ M_ras @ F4`` with ``F4 = diag(-1, -1, 1, 1)`` (its own inverse, so the
same formula goes both ways).

Direction
---------
An ITK transform file used to resample a *moving* image onto a *fixed* grid (``antsApplyTransforms -i moving
-r fixed -t xfm``, or the ``fwdtransforms`` of ``antsRegistration``) maps **FIXED physical points to MOVING
physical points** (the "pull" direction). A BIDS ``from-A_to-B_mode-image_xfm`` file resamples A onto B, so it
holds the map from B points to A points. The functions here never invert anything: they convert whatever map the
caller hands them, and the caller decides which direction it is.

ITK text format written here::

    #Insight Transform File V1.0
    #Transform 0
    Transform: AffineTransform_double_3_3
    Parameters: m00 m01 m02 m10 m11 m12 m20 m21 m22 t0 t1 t2
    FixedParameters: c0 c1 c2

and a point maps as ``y = M @ (x - c) + c + t`` (LPS mm). Files are written with ``c = 0``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atlasgs_bids.atomic import atomic_write_bytes

from atlasgs_bids.errors import InputError

__all__ = ["LPS_FLIP", "itk_to_ras", "ras_to_itk", "write_itk_affine", "read_itk_affine", "read_target2t1w",
           "rotation_angle_deg"]

#: ``diag(-1, -1, 1, 1)``: converts homogeneous points between RAS and LPS (its own inverse).
LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

# Transform types whose ITK Parameters are exactly (3x3 matrix row-major, translation).
_MATRIX_TYPES = (
    "AffineTransform_double_3_3",
    "AffineTransform_float_3_3",
    "MatrixOffsetTransformBase_double_3_3",
    "MatrixOffsetTransformBase_float_3_3",
)


def _as_affine(m: np.ndarray, name: str = "matrix") -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{name} must have shape (4, 4), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} has non-finite entries")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name} is not a homogeneous affine (last row {m[3]})")
    return m


def itk_to_ras(m: np.ndarray) -> np.ndarray:
    """Convert a linear map on LPS world points (ITK/ANTs) into the same map on RAS world points.

    Parameters
    ----------
    m : array, shape (4, 4)
        Homogeneous affine acting on LPS mm points, ``y_lps = m @ x_lps``.

    Returns
    -------
    array, shape (4, 4)
        ``F4 @ m @ F4``: the same physical map acting on RAS mm points. The direction (which space is the source)
        is unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> shift_left_10 = np.eye(4); shift_left_10[0, 3] = 10.0   # +10 mm in LPS x = towards the Left
    >>> float(itk_to_ras(shift_left_10)[0, 3])   # -10 mm in RAS x = towards the Left
    -10.0
    """
    m = _as_affine(m)
    return LPS_FLIP @ m @ LPS_FLIP


def ras_to_itk(m: np.ndarray) -> np.ndarray:
    """Convert a linear map on RAS world points into the same map on LPS world points (ITK/ANTs).

    Parameters
    ----------
    m : array, shape (4, 4)
        Homogeneous affine acting on RAS mm points.

    Returns
    -------
    array, shape (4, 4)
        ``F4 @ m @ F4``, acting on LPS mm points; direction unchanged.
    """
    m = _as_affine(m)
    return LPS_FLIP @ m @ LPS_FLIP


def write_itk_affine(path: str | os.PathLike, ras_matrix: np.ndarray) -> Path:
    """Write a RAS affine as an ITK text transform file (LPS), atomically.

    Parameters
    ----------
    path : path-like
        Destination (``.txt`` or ``.tfm``). Written to a temporary file in the same folder, then renamed.
    ras_matrix : array, shape (4, 4)
        The map the file must hold, acting on RAS mm points. For a file that resamples *moving* onto *fixed*
        (e.g. BIDS ``from-<moving>_to-<fixed>_mode-image_xfm.txt``), pass the map **fixed RAS -> moving RAS**
        (for a registration result: ``RigidResult.t1w2target``).

    Returns
    -------
    Path
        The written file. It holds ``AffineTransform_double_3_3`` with FixedParameters (centre) ``0 0 0``.
    """
    m_lps = ras_to_itk(ras_matrix)
    params = list(m_lps[:3, :3].ravel()) + list(m_lps[:3, 3])
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        "Parameters: " + " ".join(repr(float(v)) for v in params) + "\n"
        "FixedParameters: 0 0 0\n"
    )
    return atomic_write_bytes(path, text.encode())


def _lps_from_parameters(params: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Homogeneous LPS matrix of ``y = M (x - c) + c + t`` from ITK (Parameters, FixedParameters)."""
    m = np.eye(4)
    m[:3, :3] = params[:9].reshape(3, 3)
    t = params[9:12]
    c = fixed[:3] if fixed.size >= 3 else np.zeros(3)
    m[:3, 3] = t + c - m[:3, :3] @ c
    return m


def _parse_itk_text(path: Path) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(type, Parameters, FixedParameters) of the only transform in an ITK text file, or None if not text."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return None
    if not text.startswith("#Insight Transform File"):
        return None
    kinds = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Transform:")]
    if len(kinds) != 1:
        raise InputError(f"{path}: expected exactly one transform, found {len(kinds)}")
    fields = {}
    for ln in text.splitlines():
        for key in ("Parameters", "FixedParameters"):
            if ln.startswith(key + ":"):
                fields[key] = np.array([float(v) for v in ln.split(":", 1)[1].split()], dtype=np.float64)
    if "Parameters" not in fields:
        raise InputError(f"{path}: no 'Parameters:' line")
    return kinds[0], fields["Parameters"], fields.get("FixedParameters", np.zeros(3))


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """Read a 3D linear ITK/ANTs transform file and return it as a RAS affine.

    Parameters
    ----------
    path : path-like
        An ITK text transform (``.txt``/``.tfm``, e.g. from :func:`write_itk_affine`) or the binary ``.mat``
        that ANTs/antspyx write (``0GenericAffine.mat``; read with ``ants.read_transform``). Any linear
        transform type ITK knows (Affine, MatrixOffsetTransformBase, Euler3D, VersorRigid3D, ...) is accepted.

    Returns
    -------
    array, shape (4, 4)
        The file's map acting on RAS mm points, in the file's own direction: for a transform that resamples
        moving onto fixed, the map **fixed RAS -> moving RAS**.

    Raises
    ------
    InputError
        If the file is missing, holds more than one transform, or the transform is not linear/3D.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: transform file not found")
    parsed = _parse_itk_text(path)
    if parsed is not None and parsed[0] in _MATRIX_TYPES:
        kind, params, fixed = parsed
        if params.size != 12:
            raise InputError(f"{path}: {kind} needs 12 parameters, found {params.size}")
        return itk_to_ras(_lps_from_parameters(params, fixed))
    return itk_to_ras(_lps_from_ants(path))


def read_target2t1w(xfm_file: str | os.PathLike) -> np.ndarray:
    """The target -> T1w map (target world RAS mm -> T1w world RAS mm) of a registration's transform file.

    ``xfm_file`` resamples the target onto the T1w (BIDS ``from-<suffix>_to-T1w_mode-image``, or antspyx's
    ``fwdtransforms`` with the T1w fixed), so it holds the pull map **T1w -> target** (:func:`read_itk_affine`);
    this returns its inverse, the direction the forward model and the figures use. Shape (4, 4).

    >>> import tempfile
    >>> shift = np.eye(4); shift[:3, 3] = [1.0, -2.0, 3.0]  # T1w point + shift = target point
    >>> path = write_itk_affine(Path(tempfile.mkdtemp()) / "xfm.txt", shift)
    >>> read_target2t1w(path)[:3, 3].tolist()
    [-1.0, 2.0, -3.0]
    """
    return np.linalg.inv(read_itk_affine(xfm_file))


def _lps_from_ants(path: Path) -> np.ndarray:
    """Read any linear transform with ANTs and recover its exact LPS matrix by probing four points."""
    import ants  # heavy import, only when needed

    try:
        tx = ants.read_transform(str(path), precision="double")
    except Exception as exc:  # ITK raises plain RuntimeErrors for unreadable files
        raise InputError(f"{path}: not a readable ITK/ANTs transform ({exc})") from exc
    if tx.dimension != 3:
        raise InputError(f"{path}: expected a 3D transform, found dimension {tx.dimension}")
    probes = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
    images = np.array([tx.apply_to_point(tuple(p)) for p in probes], dtype=np.float64)
    m = np.eye(4)
    m[:3, 3] = images[0]
    m[:3, :3] = (images[1:] - images[0]).T / 100.0
    # a linear transform is reproduced exactly at a fifth, generic point; anything else is not affine
    p = np.array([37.0, -53.0, 71.0])
    if not np.allclose(np.asarray(tx.apply_to_point(tuple(p))), m[:3, :3] @ p + m[:3, 3], atol=1e-4):
        raise InputError(f"{path}: transform '{tx.type}' is not linear")
    return m


def rotation_angle_deg(r: np.ndarray) -> float:
    """Rotation angle (degrees) of a 3x3 rotation matrix (or the 3x3 block of a (4, 4) affine).

    ``angle = arccos((trace(R) - 1) / 2)``; use it on ``R_a.T @ R_b`` for the angle between two rotations.
    """
    r = np.asarray(r, dtype=np.float64)[:3, :3]
    c = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))
