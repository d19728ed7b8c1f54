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

    def covered_by(self, other: "Grid", *, margin_vox: float = 1.0) -> np.ndarray:
        """(I, J, K) bool: voxels of this grid whose centre lies within ``other``'s field of view.

        Both grids must be in the same world frame (e.g. the T1w grid and the target's grid moved into T1w world,
        ``Grid.moved(target2t1w)``). Inside means ``other``'s voxel coordinates lie in ``[-margin_vox,
        n - 1 + margin_vox]`` on every axis: one voxel of margin because a thick slice's PSF (FWHM = its thickness)
        still weighs tissue up to about one slice beyond the outermost slice centre.
        """
        to_other = np.linalg.inv(other.affine) @ self.affine
        out = np.ones(self.shape, dtype=bool)
        ii, jj, kk = (np.arange(n, dtype=np.float64) for n in self.shape)
        for axis in range(3):  # coordinate `axis` of `other` is affine in (i, j, k): test it on the broadcast grid
            row = to_other[axis]
            coord = row[0] * ii[:, None, None] + row[1] * jj[None, :, None] + row[2] * kk[None, None, :] + row[3]
            out &= (coord >= -margin_vox) & (coord <= other.shape[axis] - 1 + margin_vox)
        return out


def field_of_view_mask(t1w_affine: np.ndarray, t1w_shape: tuple[int, int, int], target_affine: np.ndarray,
                       target_shape: tuple[int, int, int], target2t1w: np.ndarray, *,
                       margin_vox: float = 1.0) -> np.ndarray:
    """T1w voxels whose centre lies inside the target's field of view (:meth:`Grid.covered_by`).

    ``target_affine``: target voxel -> target world mm RAS; ``target2t1w``: target world -> T1w world mm RAS.

    >>> eye = np.eye(4)
    >>> m = field_of_view_mask(eye, (4, 4, 4), np.diag([1.0, 1.0, 2.0, 1.0]), (4, 4, 1), eye)
    >>> int(m.sum()), bool(m[:, :, 2].all()), bool(m[:, :, 3].any())  # one 2 mm slice, margin 1: z in [-2, 2]
    (48, True, False)
    """
    target = Grid(target_affine, target_shape).moved(target2t1w)
    return Grid(t1w_affine, t1w_shape).covered_by(target, margin_vox=margin_vox)
