"""Benchmark cases: the MNI152 T1w/T2w pair, thick-slice T2w simulated at several factors, and the scores.

The 1 mm T2w is the ground truth, the 1 mm T1w the guide, the 1 mm brain mask the scoring region. A case is the
T2w (and the T1w, degraded the same way for the guided filter) simulated with thick slices along one voxel axis by
:func:`atlasgs_bids.imaging.acquisition.simulate_thick_slices`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from atlasgs_bids.errors import InputError
from atlasgs_bids.imaging import metrics
from atlasgs_bids.imaging.acquisition import DEGRADATIONS, Acquisition, simulate_thick_slices

T1W_FILE = "MNI152_T1_1mm_brain.nii.gz"
T2W_FILE = "MNI152_T2_1mm_brain.nii.gz"
MASK_FILE = "MNI152_T1_1mm_brain_mask.nii.gz"



@dataclass(frozen=True)
class Subject:
    """The isotropic pair the benchmark is built from (one voxel grid).

    Attributes
    ----------
    t1w, t2w : float32 (I, J, K)
        Guide and ground truth, scanner units.
    mask : bool (I, J, K)
        Brain mask (scoring region).
    affine : (4, 4) float64
        Voxel index -> world mm (the NIfTI sform of the templates).
    """

    t1w: np.ndarray
    t2w: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.t2w.shape)


@dataclass(frozen=True)
class Case:
    """One simulated thick-slice acquisition of the subject.

    Attributes
    ----------
    factor : int
        Slice thickness and spacing in 1 mm voxels.
    degradation : {"gaussian", "atlasgs"}
    thick : float32 (I, J, Kt)
        The simulated thick-slice T2w (slice axis 2 by default).
    thick_t1w : float32 (I, J, Kt)
        The T1w degraded exactly the same way (the guided filter's low-resolution guide).
    thick_affine : (4, 4) float64
        Thick voxel index -> the same world mm frame as ``Subject.affine``.
    acquisition : Acquisition
        The acquisition model of ``thick`` as returned by the simulator.
    snr : float or None
        Rician noise added to ``thick`` (white matter mean / noise SD), None for the noiseless simulation.
    """

    factor: int
    degradation: str
    thick: np.ndarray
    thick_t1w: np.ndarray
    thick_affine: np.ndarray
    acquisition: Acquisition
    axis: int = 2
    snr: float | None = None

    @property
    def label(self) -> str:
        """``degradation``, with ``+snr<snr>`` when noise was added (:func:`add_rician_noise`)."""
        return self.degradation if self.snr is None else f"{self.degradation}+snr{self.snr:g}"


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise InputError(f"benchmark data file not found: {path}")
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim != 3 or not np.all(np.isfinite(data)):
        raise InputError(f"{path}: expected a finite 3D image, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def load_subject(data_dir: str | Path, *, crop: int | None = None) -> Subject:
    """Load the MNI152 pair and mask from ``data_dir`` (the ``mni152-hcp`` folder).

    Parameters
    ----------
    data_dir : path
        Folder holding ``MNI152_T1_1mm_brain``, ``MNI152_T2_1mm_brain`` and ``MNI152_T1_1mm_brain_mask``.
    crop : int, optional
        Keep only a central ``crop x crop`` column in plane (voxel axes 0 and 1), full extent along axis 2;
        the affine is shifted so that world positions are unchanged.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"benchmark data folder not found: {data_dir} (expected the mni152-hcp folder)")
    t1w, affine = _load(data_dir / T1W_FILE)
    t2w, aff2 = _load(data_dir / T2W_FILE)
    mask, aff3 = _load(data_dir / MASK_FILE)
    for name, arr, aff in ((T2W_FILE, t2w, aff2), (MASK_FILE, mask, aff3)):
        if arr.shape != t1w.shape or not np.allclose(aff, affine, atol=1e-4):
            raise InputError(f"{data_dir / name}: not on the grid of {T1W_FILE}")
    mask = mask > 0.5
    if crop is not None:
        t1w, t2w, mask, affine = crop_center(crop, t1w, t2w, mask, affine=affine)
    return Subject(t1w=t1w, t2w=t2w, mask=mask, affine=affine)


def crop_center(size: int, *arrays: np.ndarray, affine: np.ndarray) -> tuple:
    """Central ``size x size`` in-plane crop (axes 0, 1) of each array; returns the arrays and the shifted affine."""
    shape = arrays[0].shape
    if size < 4 or size > min(shape[0], shape[1]):
        raise InputError(f"--crop {size}: must be between 4 and {min(shape[0], shape[1])} voxels")
    start = [(shape[a] - size) // 2 for a in (0, 1)]
    sl = (slice(start[0], start[0] + size), slice(start[1], start[1] + size), slice(None))
    shift = np.eye(4)
    shift[:2, 3] = start
    return (*(np.ascontiguousarray(a[sl]) for a in arrays), np.asarray(affine, dtype=np.float64) @ shift)


def simulate(data: np.ndarray, affine: np.ndarray, factor: int, *, axis: int = 2,
             degradation: str = "gaussian") -> tuple[np.ndarray, np.ndarray, Acquisition]:
    """Thick slices of ``data`` through the project's simulator (see ``imaging.acquisition``).

    Returns ``(thick, thick_affine, acquisition)``: thick (I, J, Kt) along ``axis=2``, float64 for float64 input,
    else float32; thick_affine (4, 4) thick voxel index -> the world frame of ``affine``.
    """
    thick, thick_affine, acq = simulate_thick_slices(data, affine, int(factor), axis=axis, degradation=degradation)
    return thick, np.asarray(thick_affine, dtype=np.float64), acq  # float64 for float64 input, else float32


def make_case(subject: Subject, factor: int, degradation: str, *, axis: int = 2) -> Case:
    """Simulate the thick-slice T2w (and the equally degraded T1w) at ``factor`` with ``degradation``."""
    if degradation not in DEGRADATIONS:
        raise InputError(f"unknown degradation {degradation!r}; choose from {', '.join(DEGRADATIONS)}")
    if factor < 1:
        raise InputError(f"factor must be a positive integer, got {factor}")
    thick, thick_affine, acq = simulate(subject.t2w, subject.affine, factor, axis=axis, degradation=degradation)
    thick_t1w, _, _ = simulate(subject.t1w, subject.affine, factor, axis=axis, degradation=degradation)
    return Case(factor=int(factor), degradation=degradation, thick=thick, thick_t1w=thick_t1w,
                thick_affine=thick_affine, acquisition=acq, axis=axis)


def add_rician_noise(case: Case, snr: float, *, seed: int = 0) -> Case:
    """The case with seeded Rician noise on its thick-slice target (the T1w guide stays noiseless).

    The noise SD is ``sigma = mean(white matter of the thick slices) / snr``; white matter is where the thick T1w
    is in its top 20 % among non-zero voxels. The magnitude is ``|thick + n1 + i n2|`` with n1, n2 ~ N(0, sigma^2)
    from ``numpy.random.default_rng(seed)``: the same seed and snr give the same data. The returned case's
    ``label`` is ``"<profile>+snr<snr>"``, so that its rows stand beside the noiseless case's.
    """
    if not np.isfinite(snr) or snr <= 0:
        raise InputError(f"--noise SNR values must be positive, got {snr}")
    guide = case.thick_t1w[case.thick_t1w > 0]
    wm = case.thick_t1w >= np.percentile(guide, 80.0)
    sigma = float(np.mean(case.thick[wm])) / float(snr)
    rng = np.random.default_rng(seed)
    noisy = np.hypot(case.thick + rng.normal(0.0, sigma, case.thick.shape), rng.normal(0.0, sigma, case.thick.shape))
    return replace(case, thick=noisy.astype(case.thick.dtype), snr=float(snr))


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of ``pred`` against ``ref`` inside ``mask`` (data range of ``ref`` in the mask)."""
    return float(metrics.psnr(pred, ref, mask))


def score(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """PSNR (dB), 3D SSIM and MAE (reference units) of ``pred`` against ``ref`` inside ``mask``.

    The data range is the reference's range inside the mask (``imaging.metrics``).
    """
    return {
        "psnr": float(metrics.psnr(pred, ref, mask)),
        "ssim": float(metrics.ssim3d(pred, ref, mask)),
        "mae": float(metrics.mae(pred, ref, mask)),
    }


def sd_scores(pred: np.ndarray, sd: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """How well an SD map ``sd`` describes the error of ``pred`` against the truth ``ref`` (same grid and units).

    Over the brain voxels where the map is defined (``mask & sd > 0``): ``sd_coverage``, the share with
    ``|pred - ref| <= 1.96 sd`` (0.95 when calibrated); ``sd_spearman``, Spearman's rank correlation of ``sd`` with
    ``|pred - ref|``; ``sd_median`` (the map's median) and ``error_median`` (median ``|pred - ref|``).
    """
    from scipy.stats import spearmanr

    inside = np.asarray(mask, dtype=bool) & (sd > 0)
    err = np.abs(np.asarray(pred, dtype=np.float64) - ref)[inside]
    s = np.asarray(sd, dtype=np.float64)[inside]
    if len(s) < 3:
        return {"sd_coverage": None, "sd_spearman": None, "sd_median": None, "error_median": None}
    return {"sd_coverage": round(float(np.mean(err <= 1.959964 * s)), 4),
            "sd_spearman": round(float(spearmanr(s, err).statistic), 4),
            "sd_median": round(float(np.median(s)), 3), "error_median": round(float(np.median(err)), 3)}
