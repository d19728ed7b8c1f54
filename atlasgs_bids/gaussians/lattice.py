"""Fast exact evaluation of a lattice scaffold: identical Gaussians on the T1w voxel centres.

On the default scaffold (ADR 0002) every Gaussian has the same covariance ``Sigma`` and sits on a T1w voxel centre,
so the value a point ``p`` measures through a PSF ``P`` from the Gaussian at node ``n`` is one kernel,

    g exp(-1/2 (n - u)^T Q (n - u)),   u = T1w voxel coordinates of p,  Q = A^T (Sigma + P)^-1 A,

with ``A`` the T1w affine's 3x3 part and ``g = sqrt(det Sigma / det(Sigma + P))``. The Gaussians that reach ``p``
are the nodes ``round(u) + o`` for a fixed set of integer offsets ``o`` (those whose cut-off ellipsoid can touch
the voxel cell around ``u``): no spatial hash, no candidate lists, one dense [points x offsets] evaluation per
chunk of points. The values are exactly those of the pairwise evaluator (:mod:`atlasgs_bids.gaussians.field`), same
cut-off, same gain, so :func:`~atlasgs_bids.gaussians.forward.measurement_matrix` stays the reference twin in the
tests. Frames: ``u`` and offsets in T1w voxel units; PSF covariances in T1w world mm^2 (RAS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from atlasgs_bids.gaussians.field import CUTOFF, quat_scale_to_covar
from atlasgs_bids.imaging.grid import Grid

#: [points x offsets] evaluated at once; bounds one chunk's memory (~40 bytes a pair).
CHUNK_PAIRS = 4_000_000


@dataclass(frozen=True)
class Lattice:
    """Where a lattice scaffold's Gaussians sit.

    grid : the T1w grid (T1w world mm RAS) whose voxel centres carry the Gaussians
    index : (I, J, K) int64 tensor, the Gaussian at each node, -1 where none
    cov : (3, 3) float64, the shared covariance (T1w world mm^2)
    """

    grid: Grid
    index: torch.Tensor
    cov: np.ndarray

    @property
    def n_gaussians(self) -> int:
        return int((self.index >= 0).sum())


@dataclass(frozen=True)
class Kernel:
    """One Gaussian footprint seen through one PSF, on the lattice (T1w voxel units).

    precision : (3, 3) Q in voxel^-2; gain : peak attenuation g; shift : (3,) where the measurement point sits
    relative to the evaluation point (a sub-slice's offset), voxels; weight : its quadrature weight
    """

    precision: np.ndarray
    gain: float
    shift: np.ndarray
    weight: float


def as_lattice(scaffold, *, tol: float = 1e-3, device: str | torch.device = "cpu") -> Lattice | None:
    """The :class:`Lattice` of a scaffold whose Gaussians share one covariance and sit on T1w voxel centres.

    Returns None for any other scaffold (an adaptive one, or a lattice whose Gaussians were moved), so callers fall
    back to the pairwise evaluator. ``tol`` in voxels (means) and relative (covariance entries).
    """
    if scaffold.meta.get("geometry") != "lattice" or scaffold.n_gaussians == 0:
        return None
    q, s = scaffold.quats, scaffold.log_scales
    if not (torch.allclose(q, q[:1].expand_as(q), atol=1e-6) and torch.allclose(s, s[:1].expand_as(s), atol=1e-6)):
        return None
    grid = scaffold.t1w_grid
    u = grid.to_voxels(scaffold.means.detach().cpu().numpy().astype(np.float64))
    nodes = np.rint(u)
    if np.abs(u - nodes).max() > tol:
        return None
    nodes = nodes.astype(np.int64)
    if nodes.min() < 0 or np.any(nodes.max(0) >= np.asarray(grid.shape)):
        return None
    index = np.full(grid.shape, -1, dtype=np.int64)
    index[tuple(nodes.T)] = np.arange(len(nodes))
    if int((index >= 0).sum()) != len(nodes):  # two Gaussians on one node: not a lattice
        return None
    cov = quat_scale_to_covar(q[:1].double(), s[:1].double()).detach().cpu().numpy()[0]
    return Lattice(grid=grid, index=torch.as_tensor(index, device=torch.device(device)), cov=cov)


def kernels(lattice: Lattice, psf_covs: list[np.ndarray], shifts_mm: list[np.ndarray] | None = None,
            weights: list[float] | None = None) -> list[Kernel]:
    """Kernels for PSFs ``psf_covs`` (T1w world mm^2), each shifted by ``shifts_mm`` (world mm) and weighted."""
    a = lattice.grid.affine[:3, :3]
    a_inv = np.linalg.inv(a)
    out = []
    for k, psf in enumerate(psf_covs):
        total = lattice.cov + np.asarray(psf, dtype=np.float64)
        gain = float(np.sqrt(max(np.linalg.det(lattice.cov), 0.0) / np.linalg.det(total)))
        shift = np.zeros(3) if shifts_mm is None else a_inv @ np.asarray(shifts_mm[k], dtype=np.float64)
        out.append(Kernel(precision=a.T @ np.linalg.inv(total) @ a, gain=gain, shift=shift,
                          weight=1.0 if weights is None else float(weights[k])))
    return out


def _cube_min_quadratic(q: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """min over x in the cube ``centres + [-radius, radius]^3`` of x^T q x, for each centre [B, 3] (projected
    gradient on the convex quadratic; 200 steps of 1 / lambda_max converge far below the margin used)."""
    if radius <= 0:
        return np.einsum("bi,ij,bj->b", centres, q, centres)
    x = np.clip(np.zeros_like(centres), centres - radius, centres + radius)
    step = 1.0 / (2.0 * np.linalg.eigvalsh(q).max())
    for _ in range(200):
        x = np.clip(x - step * 2.0 * x @ q, centres - radius, centres + radius)
    return np.einsum("bi,ij,bj->b", x, q, x)


def offsets(kerns: list[Kernel], *, cutoff: float = CUTOFF, radius: float = 0.5) -> np.ndarray:
    """Integer node offsets [B, 3] (C order) that any kernel can reach from a point within ``radius`` voxels
    (per axis) of its nearest node: those whose cut-off ellipsoid meets the point's cell."""
    cut2 = cutoff * cutoff
    reach = []
    for k in kerns:
        half = cutoff * np.sqrt(np.diag(np.linalg.inv(k.precision)))
        reach.append(np.ceil(np.abs(k.shift) + half + radius).astype(int))
    r = np.max(reach, axis=0)
    cand = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in r], indexing="ij"), -1).reshape(-1, 3)
    keep = np.zeros(len(cand), dtype=bool)
    for k in kerns:
        # A point at u = node - f (|f| <= radius) shifted by s measures node + o at delta = o + f - s.
        keep |= _cube_min_quadratic(k.precision, cand - k.shift, radius) < cut2 + 1e-6
    return cand[keep]


def weights(lattice: Lattice, points_vox: np.ndarray, kerns: list[Kernel], *, cutoff: float = CUTOFF,
            chunk_pairs: int = CHUNK_PAIRS) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The non-zero kernel weights between points and Gaussians, chunk by chunk.

    Parameters
    ----------
    lattice : where the Gaussians sit
    points_vox : [M, 3] float64 evaluation points in T1w voxel coordinates
    kerns : the measurement's kernels (one per sub-slice), summed with their weights

    Yields
    ------
    (start, rows, gaussians, values): rows relative to ``start`` (sorted), Gaussian indices, float32 values, on the
    lattice's device; summing ``values * a[gaussians]`` into ``rows`` measures the field.
    """
    device = lattice.index.device
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)
    nodes = np.rint(pts)
    frac = nodes - pts  # in [-0.5, 0.5]; exactly 0 when the points are nodes
    radius = float(np.abs(frac).max()) if len(pts) else 0.0
    offs = offsets(kerns, cutoff=cutoff, radius=min(radius + 1e-9, 0.5))
    reach = int(np.abs(offs).max()) if len(offs) else 0
    # A point whose node lies more than `reach` beyond the grid meets no Gaussian: it gets no entries. The others
    # are looked up in the node index padded by 2 x reach, so a node's linear index is one addition, one gather.
    shape = np.asarray(lattice.grid.shape)
    near = np.all((nodes >= -reach) & (nodes < shape + reach), axis=1)
    pad = 2 * reach
    padded = torch.full(tuple(shape + 2 * pad), -1, dtype=torch.int32, device=device)
    padded[pad:pad + shape[0], pad:pad + shape[1], pad:pad + shape[2]] = lattice.index
    dims = shape + 2 * pad
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    flat_index = padded.reshape(-1)
    off_lin = torch.as_tensor(offs @ strides, device=device)
    off_f = torch.as_tensor(offs, dtype=torch.float32, device=device)
    ks = []
    for k in kerns:
        q = torch.as_tensor(k.precision, dtype=torch.float32, device=device)
        ks.append((q, torch.as_tensor(k.shift, dtype=torch.float32, device=device), k.gain * k.weight,
                   ((off_f @ q) * off_f).sum(-1)))  # o^T Q o per offset
    cut2 = cutoff * cutoff
    step = max(1, chunk_pairs // max(len(offs), 1))
    for start in range(0, len(pts), step):
        stop = min(start + step, len(pts))
        sel = np.flatnonzero(near[start:stop])
        if not len(sel) or not len(offs):
            continue
        lin0 = torch.as_tensor((nodes[start:stop][sel].astype(np.int64) + pad) @ strides, device=device)
        gauss = flat_index[lin0[:, None] + off_lin[None, :]]  # [m, B]
        f = torch.as_tensor(frac[start:stop][sel], dtype=torch.float32, device=device)
        val = torch.zeros(gauss.shape, dtype=torch.float32, device=device)
        for q, sh, g, ooq in ks:
            fs = f - sh
            fq = fs @ q
            # (f + o)^T Q (f + o) = f^T Q f + 2 (Q f) . o + o^T Q o
            m = ((fq * fs).sum(-1)[:, None] + 2.0 * fq @ off_f.T) + ooq[None, :]
            val += torch.exp(-0.5 * m) * (m < cut2) * g
        keep = (gauss >= 0) & (val > 0)
        rows, b = keep.nonzero(as_tuple=True)
        yield start, torch.as_tensor(sel, device=device)[rows], gauss[rows, b].long(), val[rows, b]


def apply(lattice: Lattice, points_vox: np.ndarray, kerns: list[Kernel], amplitudes: torch.Tensor, *,
          cutoff: float = CUTOFF, chunk_pairs: int = CHUNK_PAIRS) -> torch.Tensor:
    """Measure the field with ``amplitudes`` [N, C] at ``points_vox`` [M, 3] (T1w voxel coordinates): [M, C]."""
    amps = amplitudes if amplitudes.ndim == 2 else amplitudes[:, None]
    out = torch.zeros(len(points_vox), amps.shape[1], dtype=amps.dtype, device=amps.device)
    for start, rows, gauss, vals in weights(lattice, points_vox, kerns, cutoff=cutoff, chunk_pairs=chunk_pairs):
        out.index_add_(0, start + rows, vals[:, None].to(amps.dtype) * amps.index_select(0, gauss))
    return out


def operator(lattice: Lattice, points_vox: np.ndarray, kerns: list[Kernel], *, cutoff: float = CUTOFF,
             chunk_pairs: int = CHUNK_PAIRS):
    """The measurement operator [M, N] as a :class:`~atlasgs_bids.gaussians.sparse.SparseMatrix` built row-sorted
    (CSR directly, no COO sort)."""
    from atlasgs_bids.gaussians.sparse import SparseMatrix

    m = len(points_vox)
    counts = torch.zeros(m, dtype=torch.long, device=lattice.index.device)
    cols, vals = [], []
    for start, rows, gauss, v in weights(lattice, points_vox, kerns, cutoff=cutoff, chunk_pairs=chunk_pairs):
        counts.index_add_(0, start + rows, torch.ones_like(rows))
        cols.append(gauss.to(torch.int32))  # half the memory of int64 while the chunks accumulate
        vals.append(v)
    indptr = torch.zeros(m + 1, dtype=torch.long, device=counts.device)
    indptr[1:] = torch.cumsum(counts, 0)
    empty = torch.zeros(0, dtype=torch.int32, device=counts.device)
    return SparseMatrix.from_csr(indptr, torch.cat(cols) if cols else empty,
                                 torch.cat(vals) if vals else torch.zeros(0, device=counts.device),
                                 (m, lattice.n_gaussians), lattice.index.device)


def neighbours(lattice: Lattice, k: int, *, reach: int = 2,
               chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray] | None:
    """Each Gaussian's ``k`` nearest other Gaussians from the node index: distances [N, k] (world mm, float32) and
    indices (int32).

    Candidates are the nodes within ``reach`` voxels, in order of world distance (ties in C order of the offset);
    returns None when some Gaussian has fewer than ``k`` within reach (an isolated one: the caller's k-d tree then
    searches farther).
    """
    a = lattice.grid.affine[:3, :3]
    r = np.arange(-reach, reach + 1)
    offs = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    offs = offs[np.any(offs != 0, axis=1)]
    dist = np.linalg.norm(offs @ a.T, axis=1)
    order = np.argsort(dist, kind="stable")
    offs, dist = offs[order], dist[order]
    index = lattice.index.cpu().numpy()
    shape = np.asarray(index.shape)
    padded = np.full(tuple(shape + 2 * reach), -1, dtype=np.int64)
    padded[reach:reach + shape[0], reach:reach + shape[1], reach:reach + shape[2]] = index
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    flat = padded.reshape(-1)
    nodes = np.argwhere(index >= 0)
    ids = index[tuple(nodes.T)]
    off_lin = offs @ strides
    out_nbr = np.empty((len(ids), k), dtype=np.int32)  # int32 / float32: k = 26 at 1 mm is 56 M entries each
    out_dist = np.empty((len(ids), k), dtype=np.float32)
    lin = (nodes + reach) @ strides
    # Most nodes have their k nearest offsets all present (the face neighbours inside the brain): take them as they
    # are when the k-th offset is strictly nearer than the next; search the full neighbourhood for the others.
    first = flat[lin[:, None] + off_lin[None, :k]]
    full = np.all(first >= 0, axis=1) & (dist[k - 1] < dist[k] if k < len(dist) else True)
    out_nbr[ids[full]] = first[full]
    out_dist[ids[full]] = dist[:k]
    rest = np.flatnonzero(~full)
    for start in range(0, len(rest), chunk):
        sel = rest[start:start + chunk]
        cand = flat[lin[sel][:, None] + off_lin[None, :]]  # [n, B], nearest first
        valid = cand >= 0
        take = valid & (np.cumsum(valid, axis=1) <= k)
        if np.any(take.sum(1) < k):
            return None
        cols = np.nonzero(take)[1].reshape(-1, k)
        out_nbr[ids[sel]] = np.take_along_axis(cand, cols, axis=1)
        out_dist[ids[sel]] = dist[cols]
    return out_dist, out_nbr
