"""Voxel-basis twin of stage 2: one unknown per 1 mm voxel, exact slice profile, T1-weighted Laplacian, CG.

Solves, for the 1 mm image x (normalised units) on the voxels of a slightly dilated brain mask,

    min_x ||S x - y||^2 + lambda x^T L x      <=>      (S^T S + lambda L) x = S^T y

where ``S`` is the measurement operator of the thick-slice acquisition along one voxel axis (the same blur and
decimation / pooling as the simulation, held as a (Kt, K) matrix acting on that axis) and ``L`` the graph Laplacian
of the 6-neighbour grid restricted to the mask, with weights ``w_ij = exp(-(t_i - t_j)^2 / h^2)`` on the T1w ``t``
normalised to its 99th percentile in the mask. Smooth inside a tissue, free across T1 edges. Solved by conjugate
gradients with a Jacobi preconditioner, in torch (CPU or CUDA), vectorised over the grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from atlasgs_bids.gaussians.solve import conjugate_gradient
from atlasgs_bids.imaging.intensity import fit_intensity_scale


@dataclass(frozen=True)
class SliceOperator:
    """A linear measurement acting along one voxel axis: ``(S x)[..., m, ...] = sum_k matrix[m, k] x[..., k, ...]``.

    Attributes
    ----------
    matrix : float64 (Kt, K)
        Row m holds the weights with which thick slice m sees the 1 mm slices k.
    axis : int
        The voxel axis it acts on (the slice axis).
    """

    matrix: np.ndarray
    axis: int = 2

    def apply(self, x: np.ndarray) -> np.ndarray:
        """S x: (..., K, ...) -> (..., Kt, ...) along ``axis``."""
        out = np.tensordot(np.asarray(x, dtype=np.float64), self.matrix, axes=([self.axis], [1]))
        return np.moveaxis(out, -1, self.axis)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """S^T y: (..., Kt, ...) -> (..., K, ...) along ``axis``."""
        out = np.tensordot(np.asarray(y, dtype=np.float64), self.matrix, axes=([self.axis], [0]))
        return np.moveaxis(out, -1, self.axis)


def slice_operator(n: int, factor: int, degradation: str, *, axis: int = 2, simulate=None) -> SliceOperator:
    """The exact measurement operator of the thick-slice simulation along ``axis``, read off the simulator.

    The simulator is linear and acts along ``axis`` only, so its matrix is its response to the unit vectors:
    one call on a (n, 1, n)-shaped stack of them (in-plane size 1 along the other axis). ``run`` checks on the
    real volume that ``S x`` reproduces the simulator's output.

    Parameters
    ----------
    n : int
        Number of 1 mm voxels along ``axis``.
    simulate : callable, optional
        ``simulate(data, affine, factor, axis=, degradation=) -> (thick, thick_affine, acq)``; default
        :func:`atlasgs_bids.bench.cases.simulate`.
    """
    if simulate is None:
        from atlasgs_bids.bench.cases import simulate
    eye = np.eye(n, dtype=np.float64)  # float64 in, float64 out: the matrix is exact to rounding
    probe = np.zeros((n, 1, n), dtype=np.float64)
    probe[:, 0, :] = eye  # probe[i, 0, :] = e_i along the last axis
    probe = np.moveaxis(probe, 2, axis)  # put the unit vectors on ``axis``; axis 1 (size 1) stays untouched
    other = [a for a in range(3) if a != axis]
    thick, _, _ = simulate(probe, np.eye(4), factor, axis=axis, degradation=degradation)
    thick = np.moveaxis(np.asarray(thick, dtype=np.float64), (axis, other[0], other[1]), (2, 0, 1))
    # thick: (n, 1, Kt): row i is the response to the unit vector e_i, i.e. column i of S
    return SliceOperator(matrix=np.ascontiguousarray(thick[:, 0, :].T), axis=axis)


def edge_weights(t1w: np.ndarray, mask: np.ndarray, *, h: float = 0.1) -> list[np.ndarray]:
    """Laplacian edge weights ``exp(-(t_i - t_j)^2 / h^2)`` between 6-neighbours, zero unless both are in ``mask``.

    Parameters
    ----------
    t1w : float (I, J, K)
        The guide, already normalised (99th percentile in the mask = 1).
    mask : bool (I, J, K)
        Voxels that carry an unknown.

    Returns
    -------
    list of 3 float32 arrays
        Weight of the edge (v, v + e_a), shape (I, J, K) with axis a one shorter.
    """
    t = np.asarray(t1w, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    out = []
    for a in range(3):
        n = t.shape[a]
        d = np.diff(t, axis=a)
        both = np.take(m, np.arange(n - 1), axis=a) & np.take(m, np.arange(1, n), axis=a)
        out.append((np.exp(-(d * d) / (h * h)) * both).astype(np.float32))
    return out


def _laplacian(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """(L x)_v = sum_u w_vu (x_v - x_u) over the 6 neighbours, vectorised per axis."""
    out = torch.zeros_like(x)
    for a, w in enumerate(weights):
        n = x.shape[a]
        f = w * (x.narrow(a, 1, n - 1) - x.narrow(a, 0, n - 1))  # flow on edge (v, v + e_a)
        out.narrow(a, 0, n - 1).sub_(f)
        out.narrow(a, 1, n - 1).add_(f)
    return out


def _along(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply ``matrix`` (P, Q) along ``axis`` of x (size Q there)."""
    y = torch.movedim(x, axis, -1) @ matrix.T
    return torch.movedim(y, -1, axis)


@dataclass
class VoxelBasisResult:
    """The solve's output: ``data`` float32 (I, J, K) in the target's units, zero outside the dilated mask."""

    data: np.ndarray
    iterations: int
    seconds: float
    relative_residual: float
    params: dict = field(default_factory=dict)


def solve_voxel_basis(
    thick: np.ndarray,
    operator: SliceOperator,
    t1w: np.ndarray,
    mask: np.ndarray,
    *,
    lam: float = 0.1,
    h: float = 0.1,
    x0: np.ndarray | None = None,
    dilate: int = 2,
    tol: float = 1e-4,
    max_iter: int = 400,
    device: str = "cpu",
) -> VoxelBasisResult:
    """Solve ``(S^T S + lam L) x = S^T y`` on the dilated mask by Jacobi-preconditioned CG.

    Parameters
    ----------
    thick : float (I, J, Kt) (slice axis = ``operator.axis``)
        The thick-slice data y, target units.
    operator : SliceOperator
        S, mapping the 1 mm grid (I, J, K) to the thick grid.
    t1w : float (I, J, K)
        The 1 mm guide, on the output grid.
    mask : bool (I, J, K)
        Brain mask on the output grid; unknowns live on it dilated by ``dilate`` voxels.
    lam : float
        Regularisation weight lambda (data and image normalised to their 99th percentile in the mask).
    h : float
        Edge bandwidth on the normalised T1w.
    x0 : float (I, J, K), optional
        Starting point in target units (e.g. cubic interpolation); zero otherwise.
    tol : float
        Stop when ||r|| / ||S^T y|| < tol.

    Returns
    -------
    VoxelBasisResult
    """
    t0 = time.perf_counter()
    axis = operator.axis
    mask = np.asarray(mask, dtype=bool)
    region = ndimage.binary_dilation(mask, iterations=dilate) if dilate > 0 else mask.copy()
    if not region.any():
        raise ValueError("solve_voxel_basis: the mask is empty")
    # crop everything to the region's bounding box (S acts on axis only, so crop its columns and the data's rows)
    idx = np.argwhere(region)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    thick_box = tuple(box[a] if a != axis else slice(None) for a in range(3))
    matrix = operator.matrix[:, lo[axis]:hi[axis]]

    thick_mask = operator.apply(mask.astype(np.float32)) > 0.5
    scale = fit_intensity_scale(thick, thick_mask)
    t1_scale = fit_intensity_scale(t1w, mask)

    dev = torch.device(device)
    f32 = dict(dtype=torch.float32, device=dev)
    reg = torch.as_tensor(region[box], **f32)
    y = torch.as_tensor(scale.apply(thick)[thick_box], **f32)
    mat = torch.as_tensor(matrix, **f32)
    weights = [torch.as_tensor(w, **f32) for w in edge_weights(t1_scale.apply(t1w)[box], region[box], h=h)]

    def normal(x: torch.Tensor) -> torch.Tensor:
        sx = _along(x * reg, mat, axis)
        return reg * (_along(sx, mat.T, axis) + lam * _laplacian(x, weights))

    rhs = reg * _along(y, mat.T, axis)
    degree = torch.zeros_like(reg)
    for a, w in enumerate(weights):
        n = reg.shape[a]
        degree.narrow(a, 0, n - 1).add_(w)
        degree.narrow(a, 1, n - 1).add_(w)
    diag_s = torch.as_tensor((matrix ** 2).sum(axis=0), **f32)
    shape = [1, 1, 1]
    shape[axis] = -1
    diag = diag_s.reshape(shape) + lam * degree
    inv_diag = torch.where(reg > 0, 1.0 / torch.clamp(diag, min=1e-12), torch.zeros_like(diag))

    start = None if x0 is None else (reg * torch.as_tensor(scale.apply(x0)[box], **f32)).reshape(-1, 1)
    # the core's CG on one column: the box's voxels flattened to [N, 1]
    x, info = conjugate_gradient(lambda v: normal(v.view(reg.shape)).reshape(-1, 1), rhs.reshape(-1, 1),
                                 inv_diag.reshape(-1), x0=start, max_iter=max_iter, tol=tol)
    out = np.zeros(mask.shape, dtype=np.float32)
    out[box] = scale.invert((x.view(reg.shape) * reg).cpu().numpy())
    return VoxelBasisResult(data=out, iterations=info["iterations"], seconds=time.perf_counter() - t0,
                            relative_residual=info["relative_residual"][-1],
                            params={"lambda": lam, "h": h, "dilate": dilate, "tol": tol, "max_iter": max_iter})
