"""Robust intensity normalisation inside a mask, and its inverse (values come back in the image's units)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityScale:
    """``normalised = (data - offset) / scale``. Zero stays zero when ``offset == 0`` (the default)."""

    offset: float
    scale: float

    def apply(self, data: np.ndarray) -> np.ndarray:
        return (np.asarray(data, dtype=np.float32) - self.offset) / self.scale

    def invert(self, data: np.ndarray) -> np.ndarray:
        return np.asarray(data, dtype=np.float32) * self.scale + self.offset


def fit_intensity_scale(data: np.ndarray, mask: np.ndarray | None = None, *, percentile: float = 99.0) -> IntensityScale:
    """Scale so that the ``percentile`` of the intensities inside ``mask`` maps to 1.

    Parameters
    ----------
    data : array, shape (I, J, K) or (I, J, K, V)
        Image intensities in the scanner's units; a 4D series shares one scale.
    mask : bool array, shape (I, J, K), optional
        Voxels to take the percentile over; all finite non-zero voxels when omitted.
    """
    data = np.asarray(data)
    sel = np.isfinite(data)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        sel = sel & (m if data.ndim == m.ndim else m[..., None])
    values = data[sel]
    values = values[values != 0]
    if values.size == 0:
        raise ValueError("cannot normalise intensities: no finite non-zero voxel inside the mask")
    scale = float(np.percentile(values, percentile))
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.max(np.abs(values)))
    if scale <= 0:
        raise ValueError("cannot normalise intensities: the image is zero inside the mask")
    return IntensityScale(offset=0.0, scale=scale)
