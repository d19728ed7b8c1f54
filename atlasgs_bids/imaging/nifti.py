"""NIfTI input/output at the edge of the core: validated loading, RAS+ reorientation, atomic saving.

nibabel images live only here (and in the workflow interfaces); the core works on arrays plus an affine
``(4, 4) float64, voxel index (i, j, k) -> world mm RAS``.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasgs_bids.atomic import atomic_path

from atlasgs_bids.errors import InputError

#: Largest distance (mm) allowed between the qform's and the sform's world position of any voxel.
QFORM_SFORM_TOLERANCE_MM = 1e-3


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """(8, 3) voxel indices of the corners of a volume of spatial ``shape`` (I, J, K)."""
    axes = [[0, max(int(n) - 1, 0)] for n in shape[:3]]
    return np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T.astype(np.float64)


def qform_sform_discrepancy(header: nib.Nifti1Header, shape: tuple[int, ...]) -> float | None:
    """Largest distance in mm between where the qform and the sform put a voxel of the image.

    Both maps are affine, so the largest distance over the volume is reached at one of its 8 corners.

    Returns
    -------
    float or None
        The distance in mm, or None when the qform or the sform is not set (code 0).
    """
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not qcode or not scode or qform is None or sform is None:
        return None
    corners = _corners(shape)
    diff = nib.affines.apply_affine(qform, corners) - nib.affines.apply_affine(sform, corners)
    return float(np.linalg.norm(diff, axis=1).max())


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI-1/2 image and check that it is usable; raise :class:`InputError` naming the file if not.

    Checks, in order: the file exists; nibabel reads it as NIfTI; the whole data block decompresses and
    reads (a truncated ``.nii.gz`` fails here, not later); 3 or 4 dimensions (a 4D with one volume is fine,
    5D is refused); no spatial dimension of size 1 (a single slice cannot be placed in 3D); every voxel
    finite; not all zero; the affine finite and non-singular; and, when both the qform and the sform are
    set, that they agree to within :data:`QFORM_SFORM_TOLERANCE_MM` anywhere in the volume (nibabel and
    this app would use the sform; other tools may use the qform, so a disagreement is refused).

    Parameters
    ----------
    path : str or path-like
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nib.Nifti1Image
        The image with its data held in memory as a native-byte-order array (on-disk scaling applied, so
        the dtype is the file's or float32 when ``scl_slope`` / ``scl_inter`` are set). ``img.affine`` is
        voxel index -> world mm RAS (sform if set, else qform), exactly as nibabel reports it.

    Raises
    ------
    InputError
        For any of the problems above, with the file name and the problem in the message.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    try:
        img = nib.load(name)
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, OSError, ... on bad files
        raise InputError(f"{name}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise InputError(f"{name}: not a NIfTI image (nibabel read it as {type(img).__name__}); convert it to .nii.gz")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in (3, 4):
        raise InputError(f"{name}: image has {len(shape)} dimensions {shape}; expected a 3D volume or a 4D series")
    if min(shape[:3]) < 2:
        raise InputError(
            f"{name}: spatial shape {shape[:3]} has a single slice along an axis; a 3D volume needs >= 2 voxels per axis"
        )
    if len(shape) == 4 and shape[3] < 1:
        raise InputError(f"{name}: 4D image with no volumes {shape}")

    try:
        data = np.asanyarray(img.dataobj)
        data = np.array(data, copy=True)  # force the whole read (gzip CRC checked at EOF); detach any memmap
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on truncated or corrupt data
        raise InputError(f"{name}: the image data could not be read, the file is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    if data.dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported voxel type {data.dtype} (complex or structured data)")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"{name}: {bad} voxel(s) are NaN or infinite; replace them (e.g. by 0) before running")
    if not np.any(data):
        raise InputError(f"{name}: every voxel is zero")

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{name}: the voxel-to-world affine has non-finite entries")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(f"{name}: the voxel-to-world affine is singular (a zero voxel size or collapsed axes)")
    gap = qform_sform_discrepancy(img.header, shape)
    if gap is not None and gap > QFORM_SFORM_TOLERANCE_MM:
        raise InputError(
            f"{name}: the qform and the sform disagree by up to {gap:.4g} mm (tolerance "
            f"{QFORM_SFORM_TOLERANCE_MM} mm); this app would use the sform, other tools may use the qform. "
            "Fix the header so both describe the same geometry (or zero the wrong one's code)."
        )

    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)  # data above is already scaled
    out = img.__class__(data, affine, header)
    out.set_filename(name)
    return out


def to_canonical(img: nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    """Reorient an image to the closest RAS+ voxel order (nibabel ``as_closest_canonical``).

    Only axis permutations and flips are applied (no resampling), so voxel values are unchanged; an oblique
    affine stays oblique. The same object is returned, untouched, when the image is already RAS+.
    """
    return nib.as_closest_canonical(img)


def on_grid_of(data: np.ndarray, reference: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """``data`` as an image on ``reference``'s grid: its affine, its qform/sform codes (so every output on the T1w
    grid carries the same codes as the T1w it is on), spatial units mm (and seconds for a 4D series).

    >>> ref = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    >>> ref.set_sform(np.eye(4), code=1); ref.set_qform(np.eye(4), code=1)
    >>> img = on_grid_of(np.ones((2, 2, 2), np.uint8), ref)
    >>> int(img.header["sform_code"]), int(img.header["qform_code"]), img.header.get_xyzt_units()
    (1, 1, ('mm', 'sec'))
    """
    header = reference.header.copy() if isinstance(reference.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(np.asarray(data), reference.affine, header)
    out.set_data_dtype(np.asarray(data).dtype)
    if header is not None:
        out.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
        out.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
    out.header.set_xyzt_units("mm", "sec")
    return out


def _output_dtype(dtype: np.dtype, data: np.ndarray) -> np.dtype:
    """A dtype every NIfTI reader accepts: float32 for float data, uint8 for bool, int32 for 64-bit ints."""
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    if dtype.kind in "iu" and dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size == 0 or (data.min() >= info.min and data.max() <= info.max):
            return np.dtype(np.int32)
        return np.dtype(np.float32)
    if dtype.kind in "iu":
        return dtype.newbyteorder("=")
    raise ValueError(f"cannot write voxel type {dtype} to NIfTI")


def save_nifti(img: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write ``img`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A reader never sees a half-written file, and a failure leaves no file behind (an existing file at
    ``path`` stays as it was). Float data are written as float32 without scaling; bool as uint8; 64-bit
    integers as int32 when they fit (else float32); other integer types as they are. The affine is written
    into both the sform and the qform (codes kept from the header when set, else 1 = scanner); the qform
    is cleared (code 0) when it cannot hold the affine (shear), so the file never carries two geometries. Spatial
    units are set to mm when the header leaves them unknown.

    Parameters
    ----------
    img : nibabel image
        Any nibabel spatial image; its ``affine`` (voxel -> world mm RAS) is written.
    path : str or path-like
        Destination ``.nii`` or ``.nii.gz`` (the suffix decides compression).

    Returns
    -------
    Path
        The path written.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    if suffix not in (".nii", ".nii.gz"):
        raise ValueError(f"{path}: NIfTI output needs a .nii or .nii.gz suffix")
    data = np.asanyarray(img.dataobj)
    dtype = _output_dtype(data.dtype, data)
    data = np.asarray(data, dtype=dtype)
    header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(data, img.affine, header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(None, None)
    if out.header.get_xyzt_units()[0] == "unknown":  # the affine is in mm: say so (validator: NIFTI_UNIT)
        out.header.set_xyzt_units("mm", out.header.get_xyzt_units()[1])
    qcode = int(out.header["qform_code"]) or 1  # scanner anat when unknown
    scode = int(out.header["sform_code"]) or 1
    out.set_qform(img.affine, code=qcode)
    out.set_sform(img.affine, code=scode)
    gap = qform_sform_discrepancy(out.header, data.shape)
    if gap is not None and gap > QFORM_SFORM_TOLERANCE_MM:  # sheared affine: a qform cannot hold it
        out.set_qform(None, code=0)

    with atomic_path(path) as tmp:
        nib.save(out, tmp)
    return path
