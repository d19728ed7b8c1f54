"""One voxel grid type: an affine (voxel index -> world mm RAS) and a 3D shape, built on nibabel.affines."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes


@dataclass(frozen=True)
class Grid:
    """A regular 3D voxel grid.

    affine : (4, 4) float64, voxel index (i, j, k) -> world mm RAS (the frame is the caller's: the image's own
        world, or the T1w world after a rigid transform)
    shape : (I, J, K)
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise ValueError(f"a grid's affine must be a finite (4, 4) matrix, got shape {aff.shape}")
        shape = tuple(int(s) for s in tuple(self.shape)[:3])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"a grid's shape must be 3 positive ints, got {self.shape}")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def of(cls, img) -> "Grid":
        """The grid of a nibabel image (its affine and first three dimensions)."""
        return cls(np.asarray(img.affine, dtype=np.float64), tuple(img.shape[:3]))

    @property
    def zooms(self) -> np.ndarray:
        """(3,) voxel spacing along each voxel axis, mm."""
        return voxel_sizes(self.affine)

    def centres(self, ijk: np.ndarray) -> np.ndarray:
        """World mm [M, 3] of voxel indices ``ijk`` [M, 3] (int or fractional)."""
        return apply_affine(self.affine, np.asarray(ijk, dtype=np.float64))

    def to_voxels(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices [M, 3] of world points [M, 3] (mm, this grid's frame)."""
        return apply_affine(np.linalg.inv(self.affine), np.asarray(points, dtype=np.float64))

    def moved(self, world2world: np.ndarray) -> "Grid":
        """This grid seen from another world frame: ``world2world @ affine`` (e.g. target world -> T1w world)."""
        return Grid(np.asarray(world2world, dtype=np.float64) @ self.affine, self.shape)

    def same_as(self, other: "Grid", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))
