"""Research code: the fitted, adaptive Gaussian scaffold (Adam with densification and pruning).

Not on the app's path: the BIDS App builds the lattice scaffold
(:func:`atlasgs_bids.gaussians.scaffold.lattice_scaffold`, docs/adr/0002-scaffold-geometry.md). This geometry is kept for the benchmarks (``atlasgs-bids bench --geometry
adaptive``) and for further work on a scaffold far smaller than the lattice.

The fit: a 2 mm lattice plus Gaussians at T1w edges, amplitudes by exact least squares, then Adam on random 3D
patches of voxels, loss L1 + lambda_ssim (1 - SSIM), with periodic densification (split/clone where the positional
gradient is large) and pruning (weak amplitudes). Seeded, so a CPU run is reproducible.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import apply_affine, voxel_sizes

from atlasgs_bids.gaussians.field import CUTOFF, blur, measure, quat_scale_to_covar
from atlasgs_bids.gaussians.forward import measurement_matrix, psf_covariance
from atlasgs_bids.gaussians.linear import fit_coefficients
from atlasgs_bids.gaussians.scaffold import ProgressFn, Scaffold, check_t1w_inputs
from atlasgs_bids.gaussians.spatial_hash import build_hash
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.intensity import fit_intensity_scale
from atlasgs_bids.presets import check_quality


@dataclass(frozen=True)
class AdaptiveScaffoldOptions:
    """Settings of the adaptive scaffold fit. Lengths in mm, learning rates per Adam step.

    spacing_mm : mean spacing of the initial Gaussians inside the mask (sets N_init = mask volume / spacing^3)
    init_scale : initial sigma of the lattice Gaussians, in units of the lattice spacing
    edge_fraction : extra Gaussians at T1w edges, as a share of the lattice's
    steps : Adam iterations
    patch : edge of the cubic voxel patches, voxels (at least 7, the SSIM window); patches_per_step : patches per
        minibatch
    lambda_ssim : weight of (1 - SSIM) in the loss
    densify_every, densify_until : densification period and last step; densify_fraction: share of Gaussians
        (largest accumulated positional gradient) split or cloned each time
    prune_amplitude : Gaussians whose |amplitude| (normalised T1 units) falls below this are removed
    max_gaussians : hard cap on N
    min_scale_mm, max_scale_mm : clamp of the Gaussians' standard deviations
    hash_every : steps between rebuilds of the spatial hash; hash_margin_mm : slack of its cells
    init_iterations : CG iterations of the initial least-squares amplitudes
    """

    spacing_mm: float = 2.0
    init_scale: float = 0.6
    edge_fraction: float = 0.5
    steps: int = 600
    patch: int = 16
    patches_per_step: int = 8
    lambda_ssim: float = 0.2
    lr_means: float = 0.05
    lr_scales: float = 0.01
    lr_quats: float = 0.005
    lr_amplitudes: float = 0.01
    densify_every: int = 100
    densify_until: int = 400
    densify_fraction: float = 0.05
    prune_amplitude: float = 0.01
    max_gaussians: int = 500_000
    min_scale_mm: float = 0.25
    max_scale_mm: float = 8.0
    hash_every: int = 10
    init_iterations: int = 300
    hash_margin_mm: float = 0.5

    @classmethod
    def preset(cls, quality: str) -> "AdaptiveScaffoldOptions":
        """The Adam budget of quality ``quality`` (one of :data:`atlasgs_bids.presets.QUALITIES`)."""
        budgets = {"fast": dict(steps=100, densify_every=50, densify_until=50),
                   "default": dict(steps=300, densify_every=100, densify_until=200),
                   "best": dict(steps=1000, densify_every=100, densify_until=700)}
        return cls(**budgets[check_quality(quality)])


def _gradient_magnitude(vol: np.ndarray) -> np.ndarray:
    g = np.gradient(vol.astype(np.float32))
    return np.sqrt(sum(gi * gi for gi in g))


def _trilinear(vol: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Sample ``vol`` [I, J, K] at fractional voxel indices ``ijk`` [M, 3] (zero outside)."""
    shape = torch.tensor(vol.shape, device=vol.device, dtype=ijk.dtype)
    grid = (2.0 * ijk / (shape - 1).clamp_min(1) - 1.0).flip(-1)  # grid_sample wants (x=k, y=j, z=i)
    out = F.grid_sample(vol[None, None], grid[None, None, None], align_corners=True, padding_mode="zeros")
    return out.reshape(-1)


def _initial_geometry(
    t1n: np.ndarray, mask: np.ndarray, affine: np.ndarray, opts: AdaptiveScaffoldOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Initial means [N, 3] (world mm) and isotropic sigmas [N] (mm).

    A regular lattice of spacing ``spacing_mm`` over the mask (sigma = ``init_scale`` * spacing, a near partition
    of unity, so smooth regions have no holes), plus ``edge_fraction`` * N_lattice extra Gaussians at T1w edges,
    drawn with probability proportional to the gradient magnitude, half as wide.
    """
    zooms = voxel_sizes(affine)
    step = np.maximum(1, np.round(opts.spacing_mm / zooms)).astype(int)
    offset = step // 2
    lattice = np.zeros_like(mask)
    lattice[offset[0] :: step[0], offset[1] :: step[1], offset[2] :: step[2]] = True
    lat = np.argwhere(lattice & mask).astype(np.float64)
    spacing = float(np.cbrt(np.prod(step * zooms)))
    vox = np.argwhere(mask)
    grad = _gradient_magnitude(t1n)[mask]
    n_edge = int(min(len(vox), round(opts.edge_fraction * len(lat)), max(0, opts.max_gaussians - len(lat))))
    p = grad / grad.sum() if grad.sum() > 0 else None
    pick = rng.choice(len(vox), size=n_edge, replace=False, p=p)
    edge = vox[pick] + rng.uniform(-0.5, 0.5, size=(n_edge, 3))
    ijk = np.concatenate([lat, edge])
    sigma = np.concatenate([np.full(len(lat), opts.init_scale * spacing), np.full(n_edge, 0.5 * opts.init_scale * spacing)])
    sigma = np.clip(sigma, opts.min_scale_mm, opts.max_scale_mm)
    return apply_affine(affine, ijk), sigma


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one voxel: the fit also sees the zero just outside, so the field stops at the edge."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=1)


def _ssim3d(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of patch batches [B, 1, p, p, p] with a separable Gaussian window [w] (data range 1).

    The differentiable training loss of the fit, on torch tensors; the SSIM reported as a metric is scikit-image's
    (:func:`atlasgs_bids.imaging.metrics.ssim3d`, scikit-image), which autograd cannot go through.
    """
    c1, c2 = 0.01**2, 0.03**2

    def filt(v: torch.Tensor) -> torch.Tensor:
        w = window.numel()
        v = F.conv3d(v, window.view(1, 1, w, 1, 1))
        v = F.conv3d(v, window.view(1, 1, 1, w, 1))
        return F.conv3d(v, window.view(1, 1, 1, 1, w))

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean()


class _Params(torch.nn.Module):
    def __init__(self, means, quats, log_scales, amplitudes):
        super().__init__()
        self.means = torch.nn.Parameter(means)
        self.quats = torch.nn.Parameter(quats)
        self.log_scales = torch.nn.Parameter(log_scales)
        self.amplitudes = torch.nn.Parameter(amplitudes)


def _optimizer(params: _Params, opts: AdaptiveScaffoldOptions) -> torch.optim.Adam:
    return torch.optim.Adam(
        [
            {"params": [params.means], "lr": opts.lr_means},
            {"params": [params.quats], "lr": opts.lr_quats},
            {"params": [params.log_scales], "lr": opts.lr_scales},
            {"params": [params.amplitudes], "lr": opts.lr_amplitudes},
        ],
        eps=1e-15,
    )


def _densify_and_prune(
    params: _Params, grad_accum: torch.Tensor, opts: AdaptiveScaffoldOptions, gen: torch.Generator
) -> _Params:
    """Split (large) or clone (small) the Gaussians with the largest accumulated positional gradient, then prune."""
    with torch.no_grad():
        means, quats, ls, amps = (p.detach() for p in (params.means, params.quats, params.log_scales, params.amplitudes))
        n = means.shape[0]
        room = opts.max_gaussians - n
        k = int(min(room, round(opts.densify_fraction * n)))
        new = []
        if k > 0:
            top = torch.topk(grad_accum, k).indices
            scale = torch.exp(ls[top])
            # Split Gaussians wider than four times the smallest allowed sigma; clone the others.
            big = scale.max(dim=1).values > 4.0 * opts.min_scale_mm
            # Split big ones into two children drawn inside the parent; clone small ones in place.
            covs = quat_scale_to_covar(quats[top], ls[top])
            chol = torch.linalg.cholesky(covs + 1e-6 * torch.eye(3, dtype=covs.dtype, device=covs.device))
            z = torch.randn(k, 3, 1, generator=gen, dtype=means.dtype, device="cpu").to(means.device)
            offset = (chol @ z).squeeze(-1)
            child_means = torch.where(big[:, None], means[top] + offset, means[top])
            child_ls = torch.where(big[:, None], ls[top] - math.log(1.6), ls[top])
            ls = ls.clone()
            ls[top] = child_ls
            means = means.clone()
            means[top] = torch.where(big[:, None], means[top] - offset, means[top])
            # Two children share the parent's mass: each keeps the amplitude (split) or half of it (clone).
            amps = amps.clone()
            child_amps = torch.where(big[:, None], amps[top], amps[top] * 0.5)
            amps[top] = child_amps
            new = [child_means, quats[top], child_ls, child_amps]
        if new:
            means = torch.cat([means, new[0]])
            quats = torch.cat([quats, new[1]])
            ls = torch.cat([ls, new[2]])
            amps = torch.cat([amps, new[3]])
        keep = amps.abs().max(dim=1).values >= opts.prune_amplitude
        return _Params(means[keep].clone(), quats[keep].clone(), ls[keep].clone(), amps[keep].clone())


def fit_adaptive_scaffold(
    t1w: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    options: AdaptiveScaffoldOptions | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Scaffold:
    """Fit an adaptive Gaussian scaffold to a brain-masked T1w.

    Parameters
    ----------
    t1w : (I, J, K) float, the T1w in scanner units
    affine : (4, 4) voxel index -> T1w world mm RAS
    mask : (I, J, K) bool, brain mask
    options : :class:`AdaptiveScaffoldOptions` (``AdaptiveScaffoldOptions.preset("default")`` when omitted)
    seed : fixes sampling, initialisation and minibatches
    device : torch device for the optimisation
    progress : called as ``progress(step, total_steps, loss)``

    Returns
    -------
    :class:`Scaffold` on the CPU.
    """
    opts = options or AdaptiveScaffoldOptions.preset("default")
    if opts.patch < 7:
        raise ValueError(f"AdaptiveScaffoldOptions.patch must be at least 7 voxels (the SSIM window), got {opts.patch}")
    t1w = np.asarray(t1w)
    mask = np.asarray(mask).astype(bool)
    check_t1w_inputs(t1w, affine, mask)
    affine = np.asarray(affine, dtype=np.float64)
    t0 = time.perf_counter()
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    scale = fit_intensity_scale(t1w, mask)
    t1n = np.where(mask, scale.apply(t1w), 0.0).astype(np.float32)
    means0, sigma0 = _initial_geometry(t1n, mask, affine, opts, rng)
    n0 = means0.shape[0]

    vol = torch.as_tensor(t1n, device=device)
    means_t = torch.as_tensor(means0, dtype=torch.float32, device=device)
    log_scales = torch.log(torch.as_tensor(sigma0, dtype=torch.float32, device=device))[:, None].repeat(1, 3)
    quats = torch.zeros(n0, 4, device=device)
    quats[:, 0] = 1.0
    psf = torch.as_tensor(psf_covariance(affine, (1.0, 1.0, 1.0)), dtype=torch.float32, device=device)
    inv_aff = np.linalg.inv(affine)
    inv_aff_t = torch.as_tensor(inv_aff, dtype=torch.float32, device=device)

    # Amplitudes: the exact least-squares fit of the masked T1w on the initial geometry (a strong start for Adam).
    with torch.no_grad():
        covs = quat_scale_to_covar(quats, log_scales)
        ijk_fit = np.argwhere(_dilate(mask))
        a_mat = measurement_matrix(means_t, covs, affine, ijk_fit, Acquisition.from_geometry(affine, mask.shape))
        y = vol[tuple(torch.as_tensor(ijk_fit.T, device=device))][:, None]
        amps, _ = fit_coefficients(
            a_mat, y, torch.ones(n0, 1, device=device), ridge=1e-4, max_iter=opts.init_iterations, tol=1e-5
        )
        del a_mat

    params = _Params(means_t, quats, log_scales, amps)
    opt = _optimizer(params, opts)
    p = opts.patch
    offs = torch.stack(torch.meshgrid(*(torch.arange(p, device=device),) * 3, indexing="ij"), -1).reshape(-1, 3)
    mask_idx = torch.as_tensor(np.argwhere(mask), device=device)
    shape_t = torch.tensor(mask.shape, device=device)
    win = torch.exp(-0.5 * (torch.arange(7, device=device, dtype=torch.float32) - 3) ** 2 / 1.5**2)
    win = win / win.sum()
    aff_t = torch.as_tensor(affine, dtype=torch.float32, device=device)
    min_ls, max_ls = math.log(opts.min_scale_mm), math.log(opts.max_scale_mm)
    grad_accum = torch.zeros(params.means.shape[0], device=device)
    history: list[float] = []
    grid = None
    for step in range(opts.steps):
        if grid is None or step % opts.hash_every == 0:
            with torch.no_grad():
                covs = quat_scale_to_covar(params.quats, params.log_scales)
                bl = blur(covs, psf, CUTOFF)
                grid = build_hash(params.means, bl.half_extent + opts.hash_margin_mm)
        pick = torch.randint(len(mask_idx), (opts.patches_per_step,), generator=gen).to(device)
        corner = (mask_idx[pick] - p // 2).clamp(min=torch.zeros(3, device=device, dtype=torch.long))
        corner = torch.minimum(corner, (shape_t - p).clamp_min(0))
        ijk = (corner[:, None, :] + offs[None]).reshape(-1, 3).clamp(max=shape_t - 1)
        target = vol[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        pts = ijk.float() @ aff_t[:3, :3].T + aff_t[:3, 3]
        covs = quat_scale_to_covar(params.quats, params.log_scales)
        pred = measure(pts, params.means, covs, params.amplitudes, psf_cov=psf, grid=grid).squeeze(1)
        l1 = (pred - target).abs().mean()
        shape5 = (opts.patches_per_step, 1, p, p, p)
        loss = (1 - opts.lambda_ssim) * l1 + opts.lambda_ssim * (1 - _ssim3d(pred.view(shape5), target.view(shape5), win))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            if params.means.grad is not None:
                grad_accum += params.means.grad.norm(dim=1)
        opt.step()
        with torch.no_grad():
            params.log_scales.clamp_(min_ls, max_ls)
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, opts.steps, history[-1])
        if (step + 1) % opts.densify_every == 0 and step + 1 <= opts.densify_until:
            params = _densify_and_prune(params, grad_accum, opts, gen)
            opt = _optimizer(params, opts)
            grad_accum = torch.zeros(params.means.shape[0], device=device)
            grid = None

    with torch.no_grad():
        means = params.means.detach()
        ijk_means = means @ inv_aff_t[:3, :3].T + inv_aff_t[:3, 3]
        t1_values = _trilinear(vol, ijk_means)
    seconds = time.perf_counter() - t0
    meta = {
        "t1w_affine": affine.tolist(),
        "t1w_shape": list(mask.shape),
        "intensity_scale": {"offset": scale.offset, "scale": scale.scale},
        "geometry": "adaptive",
        "options": asdict(opts),
        "seed": int(seed),
        "n_initial": int(n0),
        "loss_history": history,
        "seconds": seconds,
        "device": str(device),
    }
    return Scaffold(
        means=means.cpu().float(),
        quats=params.quats.detach().cpu().float(),
        log_scales=params.log_scales.detach().cpu().float(),
        amplitudes=params.amplitudes.detach().cpu().float(),
        t1_values=t1_values.cpu().float(),
        mask=mask,
        meta=meta,
    )


