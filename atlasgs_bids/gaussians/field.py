"""The additive 3D Gaussian field and its exact measurement through a Gaussian point-spread function.

Frame: every position is in T1w world coordinates, mm, RAS. The field is

    f(x) = sum_i a_i exp(-1/2 (x - mu_i)^T Sigma_i^-1 (x - mu_i)),

and a voxel centred at c with a normalised Gaussian PSF of covariance P measures (Gaussian * Gaussian = Gaussian)

    y(c) = sum_i a_i sqrt(det Sigma_i / det(Sigma_i + P)) exp(-1/2 d^T (Sigma_i + P)^-1 d),  d = c - mu_i.

Each Gaussian is cut where the Mahalanobis distance under ``Sigma_i + P`` exceeds ``cutoff`` (3 by default); a
:class:`~atlasgs_bids.gaussians.spatial_hash.SpatialHash` finds the Gaussians that can reach each point, and points
are processed in chunks so that memory never grows with points x Gaussians.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atlasgs_bids.gaussians.spatial_hash import (
    SpatialHash,
    build_hash,
    candidate_counts,
    point_cells,
    query_candidates,
)

#: Default cut-off, in Mahalanobis units: exp(-9/2) = 1.1 % of the peak is dropped at the edge.
CUTOFF = 3.0
#: Candidate pairs processed at once; bounds the memory of one chunk (~100 bytes a pair with autograd).
MAX_PAIRS = 4_000_000


def quat_scale_to_covar(quats: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Covariances ``R S^2 R^T`` from rotations and scales.

    Parameters
    ----------
    quats : [N, 4] wxyz; normalised here
    log_scales : [N, 3] log of the standard deviations along the Gaussian's own axes, log mm

    Returns
    -------
    covs : [N, 3, 3] mm^2
    """
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    s2 = torch.exp(2.0 * log_scales)
    return (rot * s2[:, None, :]) @ rot.transpose(1, 2)


@dataclass(frozen=True)
class Blurred:
    """Gaussians convolved with one PSF: what a measurement through that PSF sees.

    precision6 : [N, 6] the unique entries (xx, yy, zz, xy, xz, yz) of (Sigma + P)^-1, mm^-2
    gain : [N] sqrt(det Sigma / det(Sigma + P)), the peak attenuation of each Gaussian
    half_extent : [N, 3] mm, half side of the axis-aligned box at the cut-off (detached)
    """

    precision6: torch.Tensor
    gain: torch.Tensor
    half_extent: torch.Tensor


def _sym6(m: torch.Tensor) -> torch.Tensor:
    """Unique entries (xx, yy, zz, xy, xz, yz) of symmetric matrices [N, 3, 3] -> [N, 6]."""
    return torch.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2]], dim=-1)


def _sym6_det_inv(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Determinant [N] and inverse [N, 6] of symmetric 3x3 matrices in (xx, yy, zz, xy, xz, yz) form.

    Closed form by the adjugate: batched ``torch.linalg`` is several times slower for 3x3 on the CPU.
    """
    a, b, c, d, e, f = s.unbind(-1)
    ca = b * c - f * f
    cb = a * c - e * e
    cc = a * b - d * d
    cd = e * f - d * c
    ce = d * f - b * e
    cf = d * e - a * f
    det = a * ca + d * cd + e * ce
    return det, torch.stack([ca, cb, cc, cd, ce, cf], dim=-1) / det[:, None]


def blur(covs: torch.Tensor, psf_cov: torch.Tensor | None = None, cutoff: float = CUTOFF) -> Blurred:
    """Convolve Gaussians ``covs`` [N, 3, 3] with one normalised Gaussian PSF ``psf_cov`` [3, 3] (mm^2)."""
    s6 = _sym6(covs)
    if psf_cov is None:
        total6 = s6
        det_total, p6 = _sym6_det_inv(total6)
        gain = torch.ones_like(det_total)
    else:
        total6 = s6 + _sym6(psf_cov.to(covs)[None])
        det_total, p6 = _sym6_det_inv(total6)
        det_own, _ = _sym6_det_inv(s6)
        gain = torch.sqrt(det_own.clamp_min(0) / det_total)
    diag = total6[:, :3].detach().clamp_min(0)
    return Blurred(precision6=p6, gain=gain, half_extent=cutoff * torch.sqrt(diag))


def _pair_values(
    points: torch.Tensor, means: torch.Tensor, blurred: Blurred, pt: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(-1/2 Mahalanobis^2) and the squared Mahalanobis distance for the pairs (pt, g), each [P]."""
    # index_select, not x[idx]: its backward accumulates deterministically on multi-threaded CPUs.
    d = torch.index_select(points, 0, pt) - torch.index_select(means, 0, g)
    p = torch.index_select(blurred.precision6, 0, g)
    m = (
        p[:, 0] * d[:, 0] ** 2
        + p[:, 1] * d[:, 1] ** 2
        + p[:, 2] * d[:, 2] ** 2
        + 2.0 * (p[:, 3] * d[:, 0] * d[:, 1] + p[:, 4] * d[:, 0] * d[:, 2] + p[:, 5] * d[:, 1] * d[:, 2])
    )
    return torch.exp(-0.5 * m), m


def _chunks(grid: SpatialHash, points: torch.Tensor, max_pairs: int):
    """Yield (start, stop, cells) so that each chunk of points has at most ~max_pairs candidate pairs."""
    cells = point_cells(grid, points)
    counts = candidate_counts(grid, cells)
    csum = torch.cumsum(counts, 0)
    start, m = 0, points.shape[0]
    while start < m:
        base = int(csum[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(csum, torch.tensor(base + max_pairs, device=csum.device), right=True))
        stop = min(max(stop, start + 1), m)
        yield start, stop, cells[start:stop]
        start = stop


def measure_pairs(
    points: torch.Tensor,
    means: torch.Tensor,
    blurred: Blurred,
    *,
    cutoff: float = CUTOFF,
    grid: SpatialHash | None = None,
    max_pairs: int = MAX_PAIRS,
):
    """Sparse measurement operator entries: for every point and every Gaussian within the cut-off,
    ``gain_i * exp(-1/2 d^T (Sigma_i + P)^-1 d)``.

    Yields chunks ``(start, pt_idx, g_idx, values)`` with ``pt_idx`` relative to ``start``; summing
    ``values * a[g_idx]`` into ``pt_idx`` gives the measurement.
    """
    if grid is None:
        grid = build_hash(means, blurred.half_extent)
    cut2 = cutoff * cutoff
    for start, stop, cells in _chunks(grid, points, max_pairs):
        pt, g = query_candidates(grid, cells)
        vals, m = _pair_values(points[start:stop], means, blurred, pt, g)
        keep = m.detach() < cut2
        pt, g, vals = pt[keep], g[keep], vals[keep]
        yield start, pt, g, vals * torch.index_select(blurred.gain, 0, g)


def measure(
    points: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    amplitudes: torch.Tensor,
    *,
    psf_cov: torch.Tensor | None = None,
    cutoff: float = CUTOFF,
    grid: SpatialHash | None = None,
    max_pairs: int = MAX_PAIRS,
) -> torch.Tensor:
    """Measure the field at ``points`` through a Gaussian PSF (or sample it where ``psf_cov`` is None).

    Parameters
    ----------
    points : [M, 3] voxel centres, T1w world mm RAS
    means : [N, 3] T1w world mm RAS
    covs : [N, 3, 3] mm^2
    amplitudes : [N, C]
    psf_cov : [3, 3] mm^2, the normalised PSF shared by all points, in the same frame
    grid : a hash built for these Gaussians blurred by this PSF (built here when omitted)

    Returns
    -------
    [M, C], differentiable with respect to means, covs and amplitudes.
    """
    if amplitudes.ndim == 1:
        amplitudes = amplitudes[:, None]
    blurred = blur(covs, psf_cov, cutoff)
    out = torch.zeros(points.shape[0], amplitudes.shape[1], dtype=amplitudes.dtype, device=points.device)
    for start, pt, g, vals in measure_pairs(
        points, means, blurred, cutoff=cutoff, grid=grid, max_pairs=max_pairs
    ):
        # Out-of-place per chunk so autograd sees every chunk; only one chunk's pairs live at a time.
        out = out.index_add(0, start + pt, vals[:, None] * torch.index_select(amplitudes, 0, g))
    return out


def _measure_dense(
    points: torch.Tensor,
    means: torch.Tensor,
    covs: torch.Tensor,
    amplitudes: torch.Tensor,
    *,
    psf_cov: torch.Tensor | None = None,
    cutoff: float | None = CUTOFF,
) -> torch.Tensor:
    """Reference twin of :func:`measure`: every point against every Gaussian (small inputs only)."""
    if amplitudes.ndim == 1:
        amplitudes = amplitudes[:, None]
    total = covs if psf_cov is None else covs + psf_cov.to(covs)
    gain = torch.sqrt(torch.linalg.det(covs) / torch.linalg.det(total))
    prec = torch.linalg.inv(total)  # [N, 3, 3]
    d = points[:, None, :] - means[None, :, :]  # [M, N, 3]
    m = torch.einsum("mni,nij,mnj->mn", d, prec, d)
    w = gain[None, :] * torch.exp(-0.5 * m)
    if cutoff is not None:
        w = torch.where(m < cutoff * cutoff, w, torch.zeros_like(w))
    return w @ amplitudes
