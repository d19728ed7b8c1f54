"""Posterior standard deviation of a stage-2 fit, rendered on any grid (issue 15; ADR 0008).

Stage 2 is linear: ``y = A B v + noise`` (normalised units, noise SD ``sigma_n``), and its penalty
``sum_k lam_k v_k^T L v_k`` is a Gaussian prior, so the posterior covariance of ``v`` is ``sigma_n^2 H^-1`` with
``H = B^T A^T A B + Lambda L``, the normal matrix :func:`~atlasgs_bids.gaussians.linear.fit_coefficients` solves.
A linear read-out ``z = r^T c`` of the amplitudes ``c = B v`` (a rendered T1w voxel, a predicted target voxel)
then has variance ``sigma_n^2 r^T B H^-1 B^T r``.

``H^-1`` is never formed: its action is sampled (perturb-and-solve; Papandreou & Yuille 2010, Gaussian case). With
``L = G^T G`` (``G`` [edges, N] the weighted incidence matrix of the Laplacian's graph) and independent standard
normals ``e_y`` (one per measurement) and ``e_k`` (one per edge and channel),

    v_s = H^-1 (B^T A^T e_y + sum_k sqrt(lam_k) G^T e_k)

has covariance ``H^-1 (B^T A^T A B + Lambda L) H^-1 = H^-1``: one draw per right-hand side, and every draw is one
column of a single multi-column CG solve that reuses the fit's own preconditioner (ADR 0007). The read-out
variance is the mean of ``(r^T B v_s)^2`` over the draws; with K draws it carries a relative error of
``sqrt(2 / K)``, which the calibration absorbs on average (:mod:`atlasgs_bids.qc.calibration`).

What the draws do not see: the amplitude bounds (the posterior is that of the unconstrained model) and a prior that
is wrong (lambda was chosen for accuracy, not as a noise model), hence the calibration of the scale.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from nibabel.affines import voxel_sizes

from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.imaging.acquisition import Acquisition

#: Posterior draws (columns of one CG solve): the per-voxel variance then has a relative error of sqrt(2 / K),
#: reduced by :data:`SMOOTH_MM`. Each column costs about one single-column solve's iteration (scipy's sparse
#: products and the coarse LU go column by column; measured on 2 CPU cores). Converged draws matter more than many
#: (measured, MNI152 x5 80 x 80 crop, SNR 15, Spearman(SD, |error|) / cost vs the fit, 1.5 mm smoothing: 8 draws at
#: tol 3e-2 0.25 / 34 %, 16 at 3e-2 0.25 / 55 %, 8 at 1e-2 0.29 / 46 %, 4 at 3e-3 0.30 / 40 %, 4 at 1e-3 0.30 /
#: 58 %).
N_SAMPLES = 4
#: CG stopping rule of the draws (relative residual; about 35 iterations with the two-level preconditioner) and its
#: cap, which bounds the cost when lambda is small (low noise): measured on the whole-brain x5 cases, a cap of 40
#: instead of 60 took the map's cost from 61 / 54 % of the fit to 45 / 45 % (noiseless / SNR 30; SNR 15 converged
#: in 37) with the same coverage and Spearman to 0.003.
SAMPLE_TOL = 3e-3
SAMPLE_MAX_ITER = 40
#: Gaussian smoothing (sigma, mm) of the rendered variance inside the mask: averages the draws' noise over nearby
#: voxels, whose true variances are alike (measured as above, 4 draws at 1e-3: Spearman 0.30 at 1.5 mm, 0.32 at
#: 2 mm, 0.32 at 2.5-3 mm, saturating; 8 draws at 3e-2: 0.11 unsmoothed, 0.21 at 1 mm).
SMOOTH_MM = 2.0
#: Output voxels per chunk when reading the draws out (bounds the operator's memory: ~100 entries a voxel).
CHUNK_VOXELS = 100_000


@dataclass(frozen=True)
class PosteriorSamples:
    """Draws from a fit's posterior, per unit noise SD.

    amplitudes : [N, K] float32, draws of ``c - c_hat`` (normalised units per unit ``sigma_n``), zero mean
    iterations : CG iterations of the draws' solve; seconds : time to draw them
    """

    amplitudes: torch.Tensor
    iterations: int = 0
    seconds: float = 0.0

    @property
    def n_samples(self) -> int:
        return int(self.amplitudes.shape[1])


def laplacian_factor(laplacian: SparseMatrix) -> sp.csr_matrix:
    """``G`` [edges, N] with ``G^T G = L`` for a graph Laplacian ``L = diag(W 1) - W``: row ``e = (i, j)`` holds
    ``sqrt(w_ij)`` at ``i`` and ``-sqrt(w_ij)`` at ``j`` (the weighted incidence matrix)."""
    w = sp.triu(-laplacian.to_scipy(), k=1).tocoo()  # float32: 29 M edges at k = 26 and 1 mm
    keep = w.data > 0
    s = np.sqrt(w.data[keep])
    # two entries per row, built in CSR directly (no COO triplets of twice the size)
    return sp.csr_matrix((np.stack([s, -s], axis=1).reshape(-1),
                          np.stack([w.row[keep], w.col[keep]], axis=1).reshape(-1).astype(np.int32),
                          np.arange(0, 2 * len(s) + 1, 2, dtype=np.int64)), shape=(len(s), laplacian.shape[1]))


def posterior_samples(a_mat: SparseMatrix, basis: torch.Tensor, laplacian: SparseMatrix | None, lams: list[float],
                      preconditioner, *, n_samples: int = N_SAMPLES, seed: int = 0, tol: float = SAMPLE_TOL,
                      max_iter: int = SAMPLE_MAX_ITER) -> PosteriorSamples:
    """Draw ``n_samples`` amplitude vectors from the posterior of a stage-2 solve (module docstring).

    Parameters
    ----------
    a_mat : the fit's measurement operator [M, N]; basis : [N, nb]; laplacian, lams : the fit's penalty
    preconditioner : the fit's ``info["preconditioner"]`` (reused: the draws' solve builds nothing)
    seed : seed of the draws (a fixed seed: the map is reproducible)
    """
    from atlasgs_bids.gaussians.linear import fit_coefficients

    t0 = time.perf_counter()
    device = basis.device
    n, nb = basis.shape
    gen = torch.Generator().manual_seed(int(seed))
    e_y = torch.randn(a_mat.shape[0], n_samples, generator=gen).to(device)
    extra = torch.zeros(nb * n, n_samples, device=device)
    if laplacian is not None:
        g_t = laplacian_factor(laplacian).T  # a CSC view: G^T e without a transposed copy (29 M edges at 1 mm)
        for k in range(nb):
            if lams[k]:
                e_k = torch.randn(g_t.shape[1], n_samples, generator=gen).numpy()
                extra[k * n:(k + 1) * n] = torch.from_numpy(g_t @ e_k).to(device) * float(np.sqrt(lams[k]))
        del g_t  # before the solve, the memory peak
    draws, info = fit_coefficients(a_mat, e_y, basis, laplacian=laplacian, lams=lams, max_iter=max_iter, tol=tol,
                                   extra_rhs=extra, preconditioner=preconditioner)
    return PosteriorSamples(amplitudes=draws.cpu().float(), iterations=int(info["iterations"]),
                            seconds=time.perf_counter() - t0)


def grid_acquisition(affine: np.ndarray, shape: tuple[int, int, int],
                     fwhm_vox: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Acquisition:
    """The :class:`~atlasgs_bids.imaging.acquisition.Acquisition` of an output grid: a Gaussian PSF of ``fwhm_vox``
    (voxel units) per voxel, as :func:`~atlasgs_bids.gaussians.render.render` measures the field."""
    return Acquisition(affine=np.asarray(affine, dtype=np.float64), shape=tuple(shape), fwhm_vox=tuple(fwhm_vox),
                       slice_axis=0)


def voxel_variance(scaffold, samples: PosteriorSamples, vox2t1w: np.ndarray, ijk: np.ndarray,
                   acquisition: Acquisition, *, device: str | torch.device = "cpu",
                   chunk_voxels: int = CHUNK_VOXELS) -> np.ndarray:
    """Variance [M] (normalised units^2 per unit noise variance) of what voxels ``ijk`` [M, 3] of a grid measure.

    ``vox2t1w`` : (4, 4) that grid's voxel index -> T1w world mm RAS; ``acquisition`` its PSF (a target's slice
    profile, or :func:`grid_acquisition` for an output grid). Each voxel's row of the measurement operator
    (:func:`~atlasgs_bids.gaussians.forward.scaffold_operator`, the renderer's exact kernels) reads the draws out;
    the variance is the mean square over the draws.
    """
    from atlasgs_bids.gaussians.forward import scaffold_operator

    ijk = np.asarray(ijk).reshape(-1, 3)
    draws = samples.amplitudes.to(device)
    out = np.zeros(len(ijk))
    for start in range(0, len(ijk), chunk_voxels):
        part = ijk[start:start + chunk_voxels]
        z = scaffold_operator(scaffold, vox2t1w, part, acquisition, device=device).matmul(draws)  # [m, K]
        out[start:start + len(part)] = z.pow(2).mean(1).double().cpu().numpy()
    return out


def noise_reference(appearance) -> float:
    """The noise SD (target units) that scales a fit's posterior: its estimate when finite and positive, else 1."""
    sigma = float(appearance.diagnostics.get("noise_sigma", float("nan")))
    return sigma if np.isfinite(sigma) and sigma > 0 else 1.0


def render_sd(appearance, affine: np.ndarray, shape: tuple[int, int, int], *, mask: np.ndarray,
              calibration: float = 1.0, fwhm_vox: tuple[float, float, float] = (1.0, 1.0, 1.0),
              smooth: bool = True, device: str | torch.device = "cpu") -> np.ndarray:
    """The posterior SD of the rendered field on a grid, in the target's own units.

    ``SD = calibration x sigma x sqrt(q)``: ``sigma`` the target's noise SD (:func:`noise_reference`), ``q`` each
    voxel's read-out variance (:func:`voxel_variance`, the voxel's PSF ``fwhm_vox`` as in
    :func:`~atlasgs_bids.gaussians.render.render`). The intensity scale cancels: ``q`` is per unit noise variance.

    Parameters
    ----------
    appearance : stage-2 result with ``posterior`` (fitted with ``posterior=True``)
    affine : (4, 4) output voxel index -> T1w world mm RAS; shape : (I, J, K)
    mask : (I, J, K) bool, voxels to fill (others 0), e.g. the brain mask inside the target's field of view
    calibration : the scale ``k`` of :func:`atlasgs_bids.qc.calibration.calibrate_sd`
    smooth : smooth the variance by :data:`SMOOTH_MM` inside ``mask`` (:func:`smooth_in_mask`)

    Returns
    -------
    float32 (I, J, K), target units.
    """
    if appearance.posterior is None:
        raise ValueError("the appearance carries no posterior draws: fit it with posterior=True")
    mask = np.asarray(mask, dtype=bool)
    ijk = np.argwhere(mask)
    q = np.zeros(tuple(shape))
    q[tuple(ijk.T)] = voxel_variance(appearance.scaffold, appearance.posterior, affine, ijk,
                                     grid_acquisition(affine, shape, fwhm_vox), device=device)
    q = smooth_in_mask(q, mask, SMOOTH_MM / voxel_sizes(affine)) if smooth else q
    return np.where(mask, calibration * noise_reference(appearance) * np.sqrt(q), 0.0).astype(np.float32)


def smooth_in_mask(data: np.ndarray, mask: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Gaussian smoothing (``sigma_vox`` per axis, voxels) of ``data`` inside ``mask``, normalised by the smoothed
    mask so that voxels outside neither leak in nor pull the edge down; 0 outside."""
    from scipy.ndimage import gaussian_filter

    m = mask.astype(np.float64)
    num = gaussian_filter(np.where(mask, data, 0.0), sigma_vox, mode="constant")
    den = gaussian_filter(m, sigma_vox, mode="constant")
    return np.where(mask, num / np.maximum(den, 1e-12), 0.0)
