"""Stage 1: fit a subject-specific scaffold of anisotropic 3D Gaussians to the brain-masked T1w.

The scaffold's geometry (means, rotations, scales) is what every target reuses; its amplitudes reproduce the
normalised T1w. Two geometries (docs/adr/0002-scaffold-geometry.md):

- "lattice" (default): one Gaussian per voxel of the dilated brain mask, nothing to optimise (:func:`lattice_scaffold`).
- "adaptive": a 2 mm lattice plus Gaussians at T1w edges, amplitudes by exact least squares, then Adam on random 3D
  patches of voxels, loss L1 + lambda_ssim (1 - SSIM), with periodic densification (split/clone where the
  positional gradient is large) and pruning (weak amplitudes). Seeded, so a CPU run is reproducible.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from atlasgs_bids.gaussians.field import CUTOFF, blur, measure, quat_scale_to_covar
from atlasgs_bids.gaussians.forward import measurement_matrix, psf_covariance, voxel_centres
from atlasgs_bids.gaussians.linear import fit_coefficients
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition
from atlasgs_bids.imaging.grid import Grid
from atlasgs_bids.gaussians.spatial_hash import build_hash
from atlasgs_bids.imaging.intensity import fit_intensity_scale

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class ScaffoldOptions:
    """Stage-1 settings. Lengths in mm, learning rates per Adam step.

    geometry : "lattice" (one Gaussian per T1w voxel, nothing to optimise: the default, see
        docs/adr/0002-scaffold-geometry.md) or "adaptive" (fitted, far fewer Gaussians, Adam + densify/prune)
    spacing_mm : mean spacing of the initial Gaussians inside the mask (sets N_init = mask volume / spacing^3)
    init_scale : initial sigma of the lattice Gaussians, in units of the lattice spacing
    edge_fraction : extra Gaussians at T1w edges, as a share of the lattice's
    steps : Adam iterations
    patch : edge of the cubic voxel patches, voxels; patches_per_step : patches per minibatch
    lambda_ssim : weight of (1 - SSIM) in the loss
    densify_every, densify_until : densification period and last step; densify_fraction: share of Gaussians
        (largest accumulated positional gradient) split or cloned each time
    prune_amplitude : Gaussians whose |amplitude| (normalised T1 units) falls below this are removed
    max_gaussians : hard cap on N
    min_scale_mm, max_scale_mm : clamp of the Gaussians' standard deviations
    """

    geometry: str = "lattice"
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
    def preset(cls, quality: str) -> "ScaffoldOptions":
        """``fast``, ``default`` or ``best``.

        The default lattice geometry has nothing to optimise, so the presets differ only in the Adam budget of the
        adaptive geometry (``dataclasses.replace(preset, geometry="adaptive")``); see docs/adr/0002.
        """
        presets = {
            "fast": cls(steps=100, densify_every=50, densify_until=50),
            "default": cls(steps=300, densify_every=100, densify_until=200),
            "best": cls(steps=1000, densify_every=100, densify_until=700),
        }
        if quality not in presets:
            raise ValueError(f"unknown quality {quality!r}: use one of {sorted(presets)}")
        return presets[quality]


@dataclass
class Scaffold:
    """A fitted Gaussian scaffold in T1w world coordinates (mm, RAS).

    means : [N, 3] float32, T1w world mm RAS
    quats : [N, 4] float32, wxyz (normalised when used)
    log_scales : [N, 3] float32, log mm
    amplitudes : [N, 1] float32, normalised T1w units (T1w / its 99th percentile in the mask)
    t1_values : [N] float32, normalised T1w intensity at each mean (for the appearance regulariser)
    mask : (I, J, K) bool, the brain mask on the T1w grid (``meta['t1w_affine']``) the scaffold covers
    meta : dict of provenance: T1w affine and shape, intensity scale, options, fit statistics, version
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    amplitudes: torch.Tensor
    t1_values: torch.Tensor
    mask: np.ndarray
    meta: dict = field(default_factory=dict)
    #: Quantities that depend on the geometry alone (lattice layout, neighbours, overlap normaliser), computed once
    #: and shared by every target of the participant; never saved, and fresh in every copy (``replace``).
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cached(self, key: str, compute: Callable[[], object]):
        """``compute()`` once per scaffold object and ``key``."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def t1w_affine(self) -> np.ndarray:
        """(4, 4) voxel -> T1w world mm RAS of the grid the scaffold was fitted on."""
        return np.asarray(self.meta["t1w_affine"], dtype=np.float64)

    @property
    def t1w_grid(self) -> Grid:
        """The T1w voxel grid the scaffold was built on (T1w world mm RAS)."""
        return Grid(self.t1w_affine, tuple(self.mask.shape))

    @property
    def n_gaussians(self) -> int:
        return int(self.means.shape[0])

    def covs(self) -> torch.Tensor:
        """[N, 3, 3] covariances, mm^2."""
        return quat_scale_to_covar(self.quats, self.log_scales)

    def to(self, device: str | torch.device) -> "Scaffold":
        return replace(
            self,
            means=self.means.to(device),
            quats=self.quats.to(device),
            log_scales=self.log_scales.to(device),
            amplitudes=self.amplitudes.to(device),
            t1_values=self.t1_values.to(device),
        )


def _check_inputs(t1w: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> None:
    if t1w.ndim != 3:
        raise ValueError(f"the T1w must be a 3D image, got an array of shape {t1w.shape}")
    if mask.shape != t1w.shape:
        raise ValueError(f"the brain mask's shape {mask.shape} differs from the T1w's {t1w.shape}")
    if min(t1w.shape) < 2:
        raise ValueError(f"the T1w has a single slice along some axis (shape {t1w.shape})")
    if not np.all(np.isfinite(t1w[mask])):
        raise ValueError("the T1w has NaN or infinite voxels inside the brain mask")
    if mask.sum() < 64:
        raise ValueError(f"the brain mask is empty or tiny ({int(mask.sum())} voxels)")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-8:
        raise ValueError("the T1w affine must be a finite, non-singular (4, 4) matrix")


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
    t1n: np.ndarray, mask: np.ndarray, affine: np.ndarray, opts: ScaffoldOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Initial means [N, 3] (world mm) and isotropic sigmas [N] (mm).

    A regular lattice of spacing ``spacing_mm`` over the mask (sigma = ``init_scale`` * spacing, a near partition
    of unity, so smooth regions have no holes), plus ``edge_fraction`` * N_lattice extra Gaussians at T1w edges,
    drawn with probability proportional to the gradient magnitude, half as wide.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
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
    return voxel_centres(affine, ijk), sigma


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one voxel: the fit also sees the zero just outside, so the field stops at the edge."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=1)


def _ssim3d(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of patch batches [B, 1, p, p, p] with a separable Gaussian window [w] (data range 1)."""
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


def _optimizer(params: _Params, opts: ScaffoldOptions) -> torch.optim.Adam:
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
    params: _Params, grad_accum: torch.Tensor, opts: ScaffoldOptions, gen: torch.Generator
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


def fit_scaffold(
    t1w: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    options: ScaffoldOptions | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Scaffold:
    """Fit the Gaussian scaffold to a brain-masked T1w.

    Parameters
    ----------
    t1w : (I, J, K) float, the T1w in scanner units
    affine : (4, 4) voxel index -> T1w world mm RAS
    mask : (I, J, K) bool, brain mask
    options : :class:`ScaffoldOptions` (``ScaffoldOptions.preset("default")`` when omitted)
    seed : fixes sampling, initialisation and minibatches
    device : torch device for the optimisation
    progress : called as ``progress(step, total_steps, loss)``

    Returns
    -------
    :class:`Scaffold` on the CPU.
    """
    opts = options or ScaffoldOptions.preset("default")
    if opts.geometry == "lattice":
        return lattice_scaffold(t1w, affine, mask)
    if opts.geometry != "adaptive":
        raise ValueError(f"unknown scaffold geometry {opts.geometry!r}: use 'lattice' or 'adaptive'")
    if opts.patch < 7:
        raise ValueError(f"ScaffoldOptions.patch must be at least 7 voxels (the SSIM window), got {opts.patch}")
    t1w = np.asarray(t1w)
    mask = np.asarray(mask).astype(bool)
    _check_inputs(t1w, affine, mask)
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


def lattice_scaffold(t1w: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, dilate: int = 1) -> Scaffold:
    """The limit scaffold: one isotropic Gaussian per T1w voxel of the (dilated) mask, nothing fitted.

    Each Gaussian sits at its voxel centre with the voxel's own PSF width (sigma = zoom / 2.3548 per axis) and
    amplitude equal to the normalised T1w there. Stage 2 on this geometry is the voxel-basis solve, generalised to
    any target orientation and slice profile by the same closed-form forward model; it costs more unknowns than an
    adaptive scaffold but needs no stage-1 optimisation (see docs/adr/0002-scaffold-geometry.md).
    """
    from scipy.ndimage import binary_dilation

    t1w = np.asarray(t1w)
    mask = np.asarray(mask).astype(bool)
    _check_inputs(t1w, affine, mask)
    affine = np.asarray(affine, dtype=np.float64)
    t0 = time.perf_counter()
    scale = fit_intensity_scale(t1w, mask)
    t1n = np.where(mask, scale.apply(t1w), 0.0).astype(np.float32)
    cover = binary_dilation(mask, iterations=dilate) if dilate > 0 else mask
    ijk = np.argwhere(cover)
    n = len(ijk)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Axis-aligned in voxel space: the rotation is the affine's own (nearest orthogonal matrix).
    u, _, vt = np.linalg.svd(affine[:3, :3] / zooms)
    rot = u @ vt
    quat = _rotation_to_quat(rot)
    values = t1n[tuple(ijk.T)]
    meta = {
        "t1w_affine": affine.tolist(),
        "t1w_shape": list(mask.shape),
        "intensity_scale": {"offset": scale.offset, "scale": scale.scale},
        "geometry": "lattice",
        "seconds": time.perf_counter() - t0,
    }
    return Scaffold(
        means=torch.as_tensor(voxel_centres(affine, ijk), dtype=torch.float32),
        quats=torch.as_tensor(np.tile(quat, (n, 1)), dtype=torch.float32),
        log_scales=torch.as_tensor(np.tile(np.log(zooms * FWHM_TO_SIGMA), (n, 1)), dtype=torch.float32),
        amplitudes=torch.as_tensor(values[:, None], dtype=torch.float32),
        t1_values=torch.as_tensor(values, dtype=torch.float32),
        mask=mask,
        meta=meta,
    )


def _rotation_to_quat(rot: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion of a proper rotation matrix (3, 3); an improper one (det < 0) is made proper first."""
    if np.linalg.det(rot) < 0:
        rot = rot * np.array([1.0, 1.0, -1.0])  # flip one axis: a Gaussian is symmetric, the covariance is unchanged
    w = np.sqrt(max(0.0, 1.0 + np.trace(rot))) / 2.0
    if w > 1e-6:
        return np.array([w, (rot[2, 1] - rot[1, 2]) / (4 * w), (rot[0, 2] - rot[2, 0]) / (4 * w), (rot[1, 0] - rot[0, 1]) / (4 * w)])
    # 180-degree rotations: take the largest diagonal element.
    i = int(np.argmax(np.diag(rot)))
    j, k = (i + 1) % 3, (i + 2) % 3
    x = np.sqrt(max(0.0, 1.0 + rot[i, i] - rot[j, j] - rot[k, k])) / 2.0
    q = np.zeros(4)
    q[0] = (rot[k, j] - rot[j, k]) / (4 * x)
    q[1 + i] = x
    q[1 + j] = (rot[j, i] + rot[i, j]) / (4 * x)
    q[1 + k] = (rot[k, i] + rot[i, k]) / (4 * x)
    return q
