"""Stage 2: fit a target's appearance on the frozen scaffold, through the target's own acquisition model.

With the geometry frozen, a target voxel's measurement is linear in the per-Gaussian coefficients:
``y = A c``, A sparse [voxels x Gaussians] (:func:`~atlasgs_bids.gaussians.forward.measurement_matrix`). We write
``c = s * v`` where ``s_i = 1 / (sum_j phi_j(mu_i))`` normalises each Gaussian by its neighbours' overlap, so that
``v_i`` is the target's intensity near Gaussian i, and solve

    min_v ||y - A diag(s) v||^2 + lambda v^T L v    subject to  0 <= c_i <= U s_i

by preconditioned conjugate gradients on the normal equations (block Jacobi + a coarse-grid correction, ADR 0007),
then a projected-gradient refinement that enforces the bounds (ADR 0005). L is the graph Laplacian of the
Gaussians' k-nearest-neighbour graph (k = 26: a lattice node's 3 x 3 x 3 neighbourhood) with weights
``(w_floor + (1 - w_floor) exp(-(t1_i - t1_j)^2 / h^2)) * g (d0 / d_ij)^2``: smooth inside a tissue, nearly free
across T1w edges (t1 normalised to its 99th percentile in the mask; d0 the median neighbour distance; g scales a
Gaussian's total geometric weight to that of 6 face neighbours, so lambda means the same for any k); the floor
keeps a Gaussian that differs from all its neighbours (a vessel, a sulcus, T1w noise) coupled to them, so the solve
has no near-null direction there. The bounds: every amplitude >= 0 (the field is a sum of non-negative Gaussians, so
the output is >= 0 everywhere) for a magnitude image, and each Gaussian's intensity at most ``U = upper x`` the
target's own 99.9th percentile. With ``tune`` (default preset), lambda and the floor are chosen from the target's
own held-out slices (:mod:`atlasgs_bids.qc.tuning`). The target image is never resampled; a 4D series is one solve
with one right-hand side per volume.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch
from nibabel.affines import apply_affine

from atlasgs_bids.gaussians.forward import (psf_covariance, scaffold_lattice, scaffold_measure, scaffold_operator,
                                            target_vox2t1w)
from atlasgs_bids.gaussians.lattice import neighbours as lattice_neighbours
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.gaussians.linear import fit_coefficients
from atlasgs_bids.gaussians.sparse import SparseMatrix
from atlasgs_bids.gaussians.uncertainty import PosteriorSamples, posterior_samples
from atlasgs_bids.imaging.acquisition import Acquisition
from atlasgs_bids.imaging.grid import Grid
from atlasgs_bids.imaging.intensity import IntensityScale, fit_intensity_scale
from atlasgs_bids.imaging.noise import graph_noise_sigma, noise_sigma_inplane


@dataclass(frozen=True)
class AppearanceOptions:
    """Stage-2 settings.

    lam : regularisation weight lambda (dimensionless; data and penalty are both in normalised intensity^2)
    h : T1w edge bandwidth of the Laplacian weights, in normalised T1w units (0.1 = 10 % of the 99th percentile)
    k_neighbours : neighbours per Gaussian in the graph (26: a lattice node's whole 3 x 3 x 3 neighbourhood, a
        nearly isotropic smoothness; 6, the face neighbours, penalises oblique edges less; ADR 0011)
    max_iter, tol : conjugate-gradient stopping rule (relative residual)
    min_mask_fraction : target voxels whose PSF lies less than this much inside the brain mask are not fitted
        (they see tissue the scaffold does not model, e.g. skull)
    basis : "affine" (intensity + T1w-proportional channel per Gaussian, the default; ADR 0002) or "intensity"
    lam_ratio : lambda of the T1w-proportional channel relative to ``lam`` (10: its gain on the T1w varies slowly,
        so the T1w's detail enters at a locally constant scale and local disagreements go to the intensity channel)
    w_floor : floor of the T1w-similarity factor of every Laplacian weight, in [0, 1): a Gaussian whose T1w differs
        from all its neighbours by more than ``h`` keeps this much coupling to them (ADR 0005)
    h_noise : the edge bandwidth used is ``max(h, h_noise * sigma_t1)``, sigma_t1 the T1w noise SD estimated on the
        scaffold (normalised T1w units; :func:`~atlasgs_bids.imaging.noise.graph_noise_sigma`); 0 disables
    nonnegative : constrain every Gaussian amplitude to >= 0 (the field is then >= 0 everywhere), applied when the
        target is a magnitude image (the 0.1st percentile of its fitted voxels >= 0)
    upper : bound each Gaussian's intensity (amplitude / overlap normaliser) by this multiple of the 99.9th
        percentile of the fitted measurements, and the rendered output is clipped there too; None: no upper bound
    bound_iter : projected-gradient iterations after CG that enforce the bounds
    tune : choose the slice profile, ``lam`` and ``w_floor`` from the target's own held-out slices before the fit
        (:func:`atlasgs_bids.qc.tuning.tune_appearance`; seven small extra fits)
    coarse_block : side (T1w voxels) of the aggregates of CG's two-level preconditioner
        (:mod:`atlasgs_bids.gaussians.precondition`); 0: Jacobi only
    noise_lam : raise ``lam`` to :func:`noise_set_lambda` of the target's own noise estimate (no extra fit; the
        presets set it; ignored when ``tune`` chose lambda)
    """

    lam: float = 0.003
    h: float = 0.04
    k_neighbours: int = 26
    max_iter: int = 400
    tol: float = 1e-5
    min_mask_fraction: float = 0.5
    basis: str = "affine"
    lam_ratio: float = 10.0
    w_floor: float = 0.0
    h_noise: float = 0.0
    nonnegative: bool = True
    upper: float | None = 1.5
    bound_iter: int = 100
    tune: bool = False
    noise_lam: bool = False
    coarse_block: int = 8

    def __post_init__(self) -> None:
        if self.basis not in ("affine", "intensity"):
            raise ValueError(f"AppearanceOptions.basis must be 'affine' or 'intensity', got {self.basis!r}")
        if not 0.0 <= self.w_floor < 1.0 or self.h_noise < 0 or self.bound_iter < 0 or (
                self.upper is not None and self.upper <= 0):
            raise ValueError(
                "AppearanceOptions needs 0 <= w_floor < 1, h_noise >= 0, bound_iter >= 0 and upper > 0 (or None), "
                f"got w_floor={self.w_floor}, h_noise={self.h_noise}, bound_iter={self.bound_iter}, upper={self.upper}"
            )
        if self.lam < 0 or self.lam_ratio < 0 or self.h <= 0 or self.k_neighbours < 1 or self.max_iter < 1:
            raise ValueError(
                "AppearanceOptions needs lam >= 0, lam_ratio >= 0, h > 0, k_neighbours >= 1 and max_iter >= 1, "
                f"got lam={self.lam}, lam_ratio={self.lam_ratio}, h={self.h}, k_neighbours={self.k_neighbours}, "
                f"max_iter={self.max_iter}"
            )

    @classmethod
    def preset(cls, quality: str) -> "AppearanceOptions":
        """The options of quality preset ``quality`` (:data:`atlasgs_bids.presets.APPEARANCE_PRESETS`); an unknown
        name is a ``ValueError``."""
        from atlasgs_bids.presets import appearance_overrides  # the one presets table; imports nothing itself

        return cls(**appearance_overrides(quality))


@dataclass
class Appearance:
    """A target's fitted appearance on a scaffold.

    scaffold : the (frozen) geometry the coefficients belong to
    coeffs : [N, V] float32 field amplitudes in normalised target units (V volumes)
    intensity : maps normalised units back to the target's own units
    diagnostics : seconds, iterations, residual_rms, history, n_measurements, options (lam and w_floor as used,
        after tuning), noise_sigma (target units) and noise_sigma_normalised, h_used, bounds, tuning (the record of
        :func:`atlasgs_bids.qc.tuning.tune_appearance`, None when not tuned)
    target_vox2t1w : (4, 4) target voxel index -> T1w world mm RAS, and ``target_shape`` its grid: the field of
        view the data constrain (outside it the field is only the regulariser's extrapolation)
    acquisition : the acquisition model the fit went through (the header's, or the slice profile chosen from the
        target's held-out slices when tuned; ``meta["profile_from_data"]``); :func:`predict` uses its profile
    fitted_ijk : [M, 3] int32 target voxel indices the fit used (None when not kept)
    fitted_residual : [M, V] float32, measured minus the forward prediction ``A c`` at ``fitted_ijk``, in the
        target's own units: the data-consistency residual, kept so QC need not rebuild ``A``
    posterior : draws from the posterior of ``coeffs`` per unit noise SD (first volume's model;
        :class:`~atlasgs_bids.gaussians.uncertainty.PosteriorSamples`), None unless fitted with ``posterior=True``
    intensity_cap : [V] the upper bound of the Gaussian intensities per volume, in the reference's target units
        (``AppearanceOptions.upper`` x the 99.9th percentile of the fitted measurements); :func:`render` clips the
        output there. None: no upper bound
    """

    scaffold: Scaffold
    coeffs: torch.Tensor
    intensity: IntensityScale
    diagnostics: dict = field(default_factory=dict)
    target_vox2t1w: np.ndarray | None = None
    target_shape: tuple[int, int, int] | None = None
    acquisition: Acquisition | None = None
    fitted_ijk: np.ndarray | None = None
    fitted_residual: np.ndarray | None = None
    posterior: PosteriorSamples | None = None
    stacks: tuple["StackFit", ...] = ()
    intensity_cap: np.ndarray | None = None

    @property
    def n_volumes(self) -> int:
        return int(self.coeffs.shape[1])

    def for_stack(self, index: int) -> "Appearance":
        """The same field seen from stack ``index`` of a multi-stack fit (:func:`fit_stacks`): its geometry, its
        fitted voxels and residual, and its intensity map, so that :func:`predict` and the residual map give that
        stack's units. Stack 0 is the reference, whose view this appearance already is."""
        st = self.stacks[index]
        return replace(self, intensity=st.intensity, target_vox2t1w=st.vox2t1w, target_shape=st.shape,
                       acquisition=st.acquisition, fitted_ijk=st.ijk, fitted_residual=st.residual)

    def field_of_view(self, grid: Grid) -> np.ndarray:
        """(I, J, K) bool on ``grid`` (T1w world): the voxels some fitted stack's slab covers; all True when the
        appearance carries no target geometry."""
        geoms = [(st.vox2t1w, st.shape) for st in self.stacks] or [(self.target_vox2t1w, self.target_shape)]
        if geoms[0][0] is None:
            return np.ones(grid.shape, dtype=bool)
        out = np.zeros(grid.shape, dtype=bool)
        for vox2t1w, shape in geoms:
            out |= grid.covered_by(Grid(vox2t1w, shape))
        return out


@dataclass(frozen=True)
class Stack:
    """One thick-slice stack to fit: its data (I, J, K[, V]) in its own units and grid, its acquisition model,
    its world mm RAS -> T1w world mm RAS map, and optionally the voxels allowed in the fit (on top of the
    brain-mask rule)."""

    data: np.ndarray
    acquisition: Acquisition
    target2t1w: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class StackFit:
    """One stack's part of a fit.

    vox2t1w : (4, 4) stack voxel index -> T1w world mm RAS; shape its grid; acquisition its model
    intensity : stack units -> the fit's normalised units (the reference stack's; for another stack its gain
        relative to the reference is folded into ``scale``)
    ijk : [M, 3] int32 fitted voxels; residual [M, V] float32 measured minus ``A c``, stack units
    weight : the stack's weight in the joint data term (reference noise variance / its own)
    noise_sigma : the stack's noise SD estimate, stack units
    """

    vox2t1w: np.ndarray
    shape: tuple[int, int, int]
    acquisition: Acquisition
    intensity: IntensityScale
    ijk: np.ndarray
    residual: np.ndarray
    weight: float = 1.0
    noise_sigma: float = float("nan")


def _check_target(data: np.ndarray, acquisition: Acquisition, target2t1w: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise ValueError(f"the target must be a 3D or 4D image, got an array of shape {data.shape}")
    if tuple(data.shape[:3]) != tuple(acquisition.shape):
        raise ValueError(f"the target's shape {data.shape[:3]} differs from its acquisition model's {acquisition.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("the target has NaN or infinite voxels")
    m = np.asarray(target2t1w, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError("target2t1w must be a finite (4, 4) matrix")
    return data.reshape(*data.shape[:3], -1).astype(np.float32)


def _mask_fraction(scaffold: Scaffold, vox2t1w: np.ndarray, ijk: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """Share [M] of each target voxel's through-plane PSF (+- FWHM/2, 5 samples) inside the scaffold's brain mask."""
    from scipy.ndimage import map_coordinates

    t1_inv = np.linalg.inv(scaffold.t1w_affine)
    axis_dir = vox2t1w[:3, acquisition.slice_axis]
    half = 0.5 * acquisition.fwhm_vox[acquisition.slice_axis]
    base = apply_affine(vox2t1w, ijk)
    frac = np.zeros(len(ijk))
    mask = scaffold.mask.astype(np.float32)
    for off in np.linspace(-half, half, 5):
        pts = base + off * axis_dir
        t1_ijk = pts @ t1_inv[:3, :3].T + t1_inv[:3, 3]
        frac += map_coordinates(mask, t1_ijk.T, order=1, mode="constant", cval=0.0)
    return frac / 5.0


def _candidate_voxels(scaffold: Scaffold, vox2t1w: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """Target voxel indices [M, 3] whose centre falls inside the scaffold's bounding box (+ one PSF)."""
    t1_inv = np.linalg.inv(scaffold.t1w_affine)
    vox2t1vox = t1_inv @ vox2t1w
    nz = np.argwhere(scaffold.mask)
    lo, hi = nz.min(0) - 8, nz.max(0) + 8
    ijk = np.indices(acquisition.shape).reshape(3, -1).T
    t1_ijk = ijk @ vox2t1vox[:3, :3].T + vox2t1vox[:3, 3]
    inside = np.all((t1_ijk >= lo) & (t1_ijk <= hi), axis=1)
    return ijk[inside]


def overlap_normaliser(scaffold: Scaffold, device: str | torch.device = "cpu") -> torch.Tensor:
    """s_i = 1 / sum_j phi_j(mu_i): how many unit Gaussians pile up at each mean (sampled through a T1w voxel).

    [N] float32 on ``device``; depends on the geometry alone, so computed once per scaffold object.
    """
    device = torch.device(device)

    def compute() -> torch.Tensor:
        psf = psf_covariance(scaffold.t1w_affine, (1.0, 1.0, 1.0))
        ones = torch.ones(scaffold.n_gaussians, 1, device=device)
        density = scaffold_measure(scaffold, scaffold.means.detach().cpu().numpy().astype(np.float64), psf, ones)
        return 1.0 / density.squeeze(1).clamp_min(1e-3)

    return scaffold.cached(f"normaliser:{device}", compute)


def scaffold_neighbours(scaffold: Scaffold, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each Gaussian's ``k`` nearest other Gaussians: distances [N, k] (mm) and indices [N, k] (int).

    Computed once per scaffold object and ``k``; on a lattice from the node index
    (:func:`~atlasgs_bids.gaussians.lattice.neighbours`), else by a k-d tree. The two differ only in how they break
    ties between equally distant neighbours.
    """
    def compute() -> tuple[np.ndarray, np.ndarray]:
        from scipy.spatial import cKDTree

        lat = scaffold_lattice(scaffold)
        found = None if lat is None else lattice_neighbours(lat, min(k, scaffold.n_gaussians - 1))
        if found is not None:  # the node index answers directly; ties at equal distance in offset order
            return found
        means = scaffold.means.detach().cpu().numpy().astype(np.float64)
        kk = min(k, len(means) - 1)
        dist, nbr = cKDTree(means).query(means, k=kk + 1)
        return dist[:, 1:], nbr[:, 1:]

    return scaffold.cached(f"neighbours:{k}", compute)


#: Total geometric edge weight per Gaussian the Laplacian is scaled to (:func:`t1_laplacian`): a lattice node's 6
#: face neighbours, the graph lambda was first tuned on.
LAPLACIAN_REFERENCE_DEGREE = 6.0


def t1_laplacian(scaffold: Scaffold, *, h: float, k: int, device: torch.device, w_floor: float = 0.0,
                 neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> SparseMatrix:
    """Sparse graph Laplacian [N, N] (float32) of the scaffold's kNN graph with T1w-similarity weights.

    Edge weight ``(w_floor + (1 - w_floor) exp(-(t1_i - t1_j)^2 / h^2)) * g (d0 / d_ij)^2``: t1 normalised T1w, h in
    its units, d0 the median nearest-neighbour distance (mm), g the scale that makes the median Gaussian's total
    geometric weight :data:`LAPLACIAN_REFERENCE_DEGREE` (k = 26 on a lattice: g = 6 / 14.67). ``neighbours``:
    :func:`scaffold_neighbours`' output, when already computed.
    """
    dist, nbr = neighbours if neighbours is not None else scaffold_neighbours(scaffold, k)
    n, k = nbr.shape
    d0 = float(np.median(dist[:, 0]))
    t1 = scaffold.t1_values.numpy().astype(np.float32)
    geo = (d0 / np.maximum(dist, 0.1 * d0)).astype(np.float32) ** 2  # [N, k]
    # Scaled so that a Gaussian's total geometric weight is that of the 6 face neighbours of a lattice node (6 at
    # spacing d0): lambda then means the same for any k (ADR 0011); k = 6 on a lattice is unchanged.
    geo *= np.float32(LAPLACIAN_REFERENCE_DEGREE / float(np.median(geo.sum(axis=1))))
    w = np.exp(-((t1[:, None] - t1[nbr]) ** 2) / np.float32(h**2))
    if w_floor:
        w = np.float32(w_floor) + np.float32(1.0 - w_floor) * w
    w *= np.float32(0.5) * geo
    del geo
    # Symmetrise, (W + W^T) / 2: an edge found from both ends gets its mean weight, from one end half its weight.
    # W is built in CSR from its rows as they are (k per Gaussian), float32 with int32 indices: at k = 26 and 1 mm
    # each copy is ~0.45 GB, so no COO triplets and no float64.
    half = sp.csr_matrix((w.reshape(-1), nbr.reshape(-1).astype(np.int32, copy=False),
                          np.arange(0, n * k + 1, k, dtype=np.int64)), shape=(n, n))
    del w
    sym = (half + half.T.tocsr()).tocsr()
    del half
    degree = np.asarray(sym.sum(axis=1), dtype=np.float32).ravel()
    sym.data *= np.float32(-1.0)
    lap = (sym + sp.diags(degree, format="csr")).tocsr()
    return SparseMatrix.from_scipy(lap, device, symmetric=True)


def fit_appearance(
    scaffold: Scaffold,
    data: np.ndarray,
    acquisition: Acquisition,
    target2t1w: np.ndarray,
    options: AppearanceOptions | None = None,
    *,
    mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    posterior: bool = False,
) -> Appearance:
    """Fit the per-Gaussian appearance of a target on a frozen scaffold.

    Parameters
    ----------
    scaffold : stage-1 result (T1w world mm RAS)
    data : (I, J, K) or (I, J, K, V), the target in its own units, never resampled
    acquisition : the target's geometry and PSF (its ``affine`` maps target voxels -> target world mm RAS)
    target2t1w : (4, 4) rigid map target world mm RAS -> T1w world mm RAS (from registration)
    options : :class:`AppearanceOptions`
    mask : (I, J, K) bool, optional, target voxels allowed in the fit (on top of the brain-mask rule)
    device : torch device of the solve
    posterior : also draw from the posterior (``Appearance.posterior``; one multi-column CG solve after the fit)

    Returns
    -------
    :class:`Appearance` (one stack: :func:`fit_stacks` with one :class:`Stack`)
    """
    return fit_stacks(scaffold, [Stack(data, acquisition, target2t1w, mask)], options, device=device,
                      posterior=posterior)


#: Stack weights in the joint data term are clipped to this range (a noise estimate can be off on a small stack).
STACK_WEIGHT_RANGE = (0.1, 10.0)


@dataclass
class _Measured:
    """One stack's fitted voxels, prepared for the joint solve."""

    vox2t1w: np.ndarray
    ijk: np.ndarray
    y_raw: np.ndarray  # [M, V] stack units
    intensity: IntensityScale
    a_mat: SparseMatrix
    sigma: float  # noise SD, stack units


def _measure_stack(scaffold: Scaffold, stack: Stack, opts: AppearanceOptions, device: torch.device,
                   vol: np.ndarray) -> _Measured:
    vox2t1w = target_vox2t1w(stack.acquisition, stack.target2t1w)
    ijk = fit_voxels(scaffold, stack.acquisition, stack.target2t1w, opts)
    if stack.mask is not None:
        ijk = ijk[np.asarray(stack.mask, dtype=bool)[tuple(ijk.T)]]
    if len(ijk) < 16:
        raise ValueError(
            "the target does not overlap the T1w brain mask after the rigid transform "
            f"({len(ijk)} target voxels inside): check the registration"
        )
    y_raw = vol[tuple(ijk.T)]  # [M, V]
    fitted_mask = np.zeros(stack.acquisition.shape, dtype=bool)
    fitted_mask[tuple(ijk.T)] = True
    sigma = noise_sigma_inplane(vol[..., 0], fitted_mask, stack.acquisition.slice_axis)
    a_mat = scaffold_operator(scaffold, vox2t1w, ijk, stack.acquisition, device=device)
    return _Measured(vox2t1w, ijk, y_raw, fit_intensity_scale(y_raw), a_mat, sigma)


def fit_stacks(
    scaffold: Scaffold,
    stacks: list[Stack],
    options: AppearanceOptions | None = None,
    *,
    device: str | torch.device = "cpu",
    posterior: bool = False,
) -> Appearance:
    """Fit ONE appearance to one or several stacks of a contrast, each through its own acquisition and transform.

    Every stack keeps its rigid transform, slice profile and intensity map; their measurements enter one solve,

        min_v sum_s w_s ||y_s - A_s B v||^2 + lambda v^T L v    (bounds as in the module docstring)

    with ``y_s`` stack s's voxels mapped into the reference stack's normalised units (stack 0 is the reference:
    the output is in its units), ``w_s`` = the reference's noise variance / stack s's (clipped to
    :data:`STACK_WEIGHT_RANGE`). A stack's intensity scale relative to the reference (another coil, scanner or
    receiver gain) is a free unknown of the same linear least-squares problem (``g_s y_s ~ A_s c``, eliminated by
    variable projection in :func:`~atlasgs_bids.gaussians.linear.fit_coefficients`), so it is estimated from
    everything the stacks share, not from a summary statistic that their different blurs would bias. Hyperparameters (``tune``) are chosen
    on the reference stack alone; ``lambda`` then weighs the prior against one stack's worth of data per row, so
    more stacks mean relatively less smoothing, as more data should.

    Parameters
    ----------
    scaffold : stage-1 result (T1w world mm RAS)
    stacks : one or more :class:`Stack` with the same number of volumes
    options : :class:`AppearanceOptions`
    device : torch device of the solve
    posterior : also draw from the posterior (``Appearance.posterior``, per unit noise SD of the reference stack:
        the weighted rows have that noise; the other stacks' gains are taken as known)

    Returns
    -------
    :class:`Appearance` seen from the reference stack (its intensity, geometry, fitted voxels and residual), with
    every stack's record in ``stacks`` (:meth:`Appearance.for_stack`)
    """
    if not stacks:
        raise ValueError("fit_stacks needs at least one stack")
    opts = options or AppearanceOptions.preset("default")
    t0 = time.perf_counter()
    device = torch.device(device)
    vols = [_check_target(st.data, st.acquisition, st.target2t1w) for st in stacks]
    if len({v.shape[3] for v in vols}) > 1:
        raise ValueError(f"the stacks have different numbers of volumes: {[v.shape[3] for v in vols]}")
    ref = stacks[0]
    tuning = None
    requested = opts  # recorded as given (the choice made by tuning is in lam / w_floor and in "tuning")
    if opts.tune:
        from atlasgs_bids.qc.tuning import tune_appearance

        if ref.mask is None:  # the slice profile may be chosen too: fit, residual and predict go through it
            opts, chosen, tuning = tune_appearance(scaffold, vols[0], ref.acquisition, ref.target2t1w, opts,
                                                   device=device)
            ref = replace(ref, acquisition=chosen)
            stacks = [ref, *stacks[1:]]
        else:  # a fit on part of the target (e.g. held-out QC): the caller chooses its hyperparameters
            opts = replace(opts, tune=False)

    measured = [_measure_stack(scaffold, st, opts, device, vol) for st, vol in zip(stacks, vols)]
    sc = scaffold.to(device)
    s = overlap_normaliser(scaffold, device)
    neighbours = scaffold_neighbours(scaffold, opts.k_neighbours)
    sigma_t1 = scaffold.cached(f"t1_sigma:{opts.k_neighbours}",
                               lambda: graph_noise_sigma(scaffold.t1_values.numpy(), neighbours[1]))
    h_used = max(opts.h, opts.h_noise * sigma_t1)
    lap = t1_laplacian(scaffold, h=h_used, k=opts.k_neighbours, device=device, w_floor=opts.w_floor,
                       neighbours=neighbours)

    # Each stack in its own normalised units (/ its 99th percentile); the fit frees every other stack's gain
    # relative to the reference (linear.fit_coefficients' free_gain) and folds it into that stack's map below.
    ref_m = measured[0]
    maps = [m.intensity for m in measured]
    ys = [torch.as_tensor(mp.apply(m.y_raw), device=device) for m, mp in zip(measured, maps)]
    sigmas_n = [m.sigma / mp.scale for m, mp in zip(measured, maps)]
    weights = [1.0] + [float(np.clip(sigmas_n[0] ** 2 / sn**2, *STACK_WEIGHT_RANGE))
                       if np.isfinite(sn) and sn > 0 and np.isfinite(sigmas_n[0]) and sigmas_n[0] > 0 else 1.0
                       for sn in sigmas_n[1:]]
    if opts.noise_lam:
        opts = replace(opts, lam=noise_set_lambda(opts.lam, sigmas_n[0]))
    if len(measured) == 1:
        a_mat, y = ref_m.a_mat, ys[0]
    else:  # rows of every stack, each scaled by sqrt(w_s), in one operator
        a_mat = SparseMatrix.from_scipy(sp.vstack([sp.diags(np.full(m.a_mat.shape[0], np.sqrt(w), np.float32))
                                                   @ m.a_mat.to_scipy() for m, w in zip(measured, weights)]).tocsr(),
                                        device)
        y = torch.cat([yy * float(np.sqrt(w)) for yy, w in zip(ys, weights)])
    # the bounds from every stack's values, in the reference's units (one stack: its own values, unchanged)
    y_bounds = ref_m.y_raw if len(measured) == 1 else maps[0].invert(torch.cat(ys).cpu().numpy())
    lower, upper, caps, bound_info = _amplitude_bounds(y_bounds, maps[0], s, opts)
    t_build = time.perf_counter() - t0

    # Basis channels: c = sum_k basis_k * v_k. "intensity": v is the target's intensity near each Gaussian;
    # "affine" adds the T1w amplitudes as a second channel (c = s v + a g), so a region with constant (v, g)
    # renders v + g * T1w: the T1w's own detail, scaled, where the target follows it.
    if opts.basis == "intensity":
        basis, lams = s[:, None], [opts.lam]
    else:
        basis, lams = torch.stack([s, sc.amplitudes[:, 0]], dim=1), [opts.lam, opts.lam * opts.lam_ratio]
    # Start from the PSF-weighted average of the measurements around each Gaussian (a splat, not a resampling).
    v0 = torch.zeros(sc.n_gaussians, basis.shape[1], y.shape[1], device=device)
    v0[:, 0] = a_mat.rmatmul(y) / a_mat.rmatmul(torch.ones_like(y[:, :1])).clamp_min(1e-6)
    rows = np.cumsum([0] + [len(m.ijk) for m in measured])
    coeffs, info = fit_coefficients(
        a_mat, y, basis, laplacian=lap, lams=lams, max_iter=opts.max_iter, tol=opts.tol, v0=v0,
        bounds=(lower, upper), bound_iter=opts.bound_iter,
        coarse=(scaffold.t1w_grid.to_voxels(scaffold.means.numpy()), opts.coarse_block) if opts.coarse_block else None,
        free_gain=[(int(rows[i]), int(rows[i + 1])) for i in range(1, len(measured))] or None,
    )
    for i, gain in enumerate(info["gains"], start=1):  # g y_s ~ A c: the stack's map gains g (first volume's)
        maps[i] = IntensityScale(offset=0.0, scale=maps[i].scale / float(gain[0]))
    fits, preds = [], []
    for st, m, mp, w in zip(stacks, measured, maps, weights):
        preds.append(m.a_mat.matmul(coeffs))
        resid = (m.y_raw - np.asarray(mp.invert(preds[-1].cpu().numpy()), dtype=np.float32)).astype(np.float32)
        fits.append(StackFit(vox2t1w=m.vox2t1w, shape=tuple(st.acquisition.shape), acquisition=st.acquisition,
                             intensity=mp, ijk=m.ijk.astype(np.int32), residual=resid, weight=w, noise_sigma=m.sigma))
    resid_ref = ys[0] - preds[0]  # normalised units
    seconds = time.perf_counter() - t0
    draws = posterior_samples(a_mat, basis, lap, lams, info["preconditioner"]) if posterior else None
    diagnostics = {
        "seconds": seconds,
        "seconds_build": t_build,
        "iterations": info["iterations"],
        "coarse": info.get("coarse"),  # the two-level preconditioner (block, coarse unknowns, seconds) or None
        "history": info["relative_residual"],
        "residual_rms": float(resid_ref.pow(2).mean().sqrt()),
        "n_measurements": int(sum(len(m.ijk) for m in measured)),
        "n_gaussians": sc.n_gaussians,
        "nnz": a_mat.nnz,
        "options": asdict(replace(opts, tune=requested.tune)),
        "device": str(device),
        # Scalars, so that the sidecar's Metrics carry them (target units; normalised: / the 99th percentile).
        "noise_sigma": ref_m.sigma,
        "noise_sigma_normalised": sigmas_n[0],
        "t1w_noise_sigma_normalised": sigma_t1,
        "noise_method": "target: in-plane Immerkaer high-pass, median |r| x 1.4826; T1w: kNN-mean residual on the "
                        "scaffold",
        "h_used": h_used,
        "tuning": tuning,
        "posterior_seconds": None if draws is None else draws.seconds,
        "posterior_iterations": None if draws is None else draws.iterations,
        "bounds": {**bound_info, "n_outside_after_cg": info.get("n_at_bound_cg"),
                   "iterations": info.get("bound_iterations", 0), "rounding": info.get("bound_rounding")},
    }
    if len(stacks) > 1:
        diagnostics["stacks"] = [
            {"n_measurements": int(len(f.ijk)), "weight": f.weight, "noise_sigma": f.noise_sigma,
             "scale_vs_reference": f.intensity.scale / maps[0].scale,
             "relative_residual": float(np.linalg.norm(f.residual) / max(np.linalg.norm(m.y_raw), 1e-30))}
            for f, m in zip(fits, measured)]
    return Appearance(
        scaffold=scaffold,
        coeffs=coeffs.cpu().float(),
        intensity=maps[0],
        diagnostics=diagnostics,
        target_vox2t1w=ref_m.vox2t1w,
        target_shape=tuple(ref.acquisition.shape),
        acquisition=ref.acquisition,
        fitted_ijk=ref_m.ijk.astype(np.int32),
        fitted_residual=fits[0].residual,
        stacks=tuple(fits),
        posterior=draws,
        intensity_cap=caps,
    )


#: noise_set_lambda: lambda >= NOISE_LAM_GAIN * sigma_n^2 (sigma_n: noise SD / the target's 99th percentile).
NOISE_LAM_GAIN = 100.0


def noise_set_lambda(lam: float, sigma_normalised: float) -> float:
    """``max(lam, NOISE_LAM_GAIN * sigma_normalised^2)``; ``lam`` when the noise estimate is not finite.

    The MAP weight of a Gaussian smoothness prior grows with the noise variance; the gain is calibrated so that
    bids-chris's PDw (sigma_n = 0.0098) gets 0.0096 (held-out slices chose 0.008-0.024 there, ADR 0005) while a
    noiseless template (sigma_n ~ 0.0015) keeps 0.003.
    """
    if not np.isfinite(sigma_normalised):
        return float(lam)
    return float(max(lam, NOISE_LAM_GAIN * sigma_normalised**2))


def _amplitude_bounds(y_raw: np.ndarray, intensity: IntensityScale, s: torch.Tensor, opts: AppearanceOptions,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, np.ndarray | None, dict]:
    """Box on each Gaussian amplitude ``c_i`` (normalised units) from the fitted measurements ``y_raw`` [M, V].

    Lower 0 when ``opts.nonnegative`` and the target is a magnitude image (0.1st percentile of ``y_raw`` >= 0).
    Upper ``opts.upper * p99.9(y_raw[:, v]) * s_i`` for volume v: the Gaussian's intensity ``c_i / s_i`` (``s_i``
    the overlap normaliser, so that a region of equal intensities u renders as u) is at most that multiple of what
    the volume itself measured in all but 0.1 % of its voxels. Returns (lower [N] or None, upper [N, V] or None, the
    caps [V] in target units or None, a JSON-safe record in target units with the cap of the first volume).
    """
    magnitude = bool(np.percentile(y_raw, 0.1) >= 0.0)
    lower = torch.zeros_like(s) if (opts.nonnegative and magnitude) else None
    upper = caps = None
    if opts.upper is not None:
        caps = opts.upper * np.percentile(y_raw, 99.9, axis=0)  # [V], target units
        upper = s[:, None] * torch.as_tensor(intensity.apply(caps), dtype=s.dtype, device=s.device)[None, :]
    record = {"lower": 0.0 if lower is not None else None,
              "upper_intensity": None if caps is None else float(caps[0]), "magnitude_image": magnitude}
    return lower, upper, caps, record


def fit_voxels(scaffold: Scaffold, acquisition: Acquisition, target2t1w: np.ndarray,
               options: AppearanceOptions | None = None) -> np.ndarray:
    """Target voxel indices [M, 3] (int) that :func:`fit_appearance` fits when given no ``mask``.

    The brain-mask rule: the voxel's centre lies in the scaffold's bounding box and at least
    ``options.min_mask_fraction`` of its through-plane PSF lies inside the scaffold's brain mask.

    Parameters
    ----------
    scaffold : stage-1 result (T1w world mm RAS)
    acquisition : the target's geometry and PSF (its ``affine``: target voxel -> target world mm RAS)
    target2t1w : (4, 4) target world mm RAS -> T1w world mm RAS
    options : :class:`AppearanceOptions` (only ``min_mask_fraction`` is used); default preset by default
    """
    opts = options or AppearanceOptions.preset("default")
    vox2t1w = target_vox2t1w(acquisition, np.asarray(target2t1w, dtype=np.float64))
    ijk = _candidate_voxels(scaffold, vox2t1w, acquisition)
    if not len(ijk):
        return ijk
    return ijk[_mask_fraction(scaffold, vox2t1w, ijk, acquisition) >= opts.min_mask_fraction]


def predict(appearance: Appearance, acquisition: Acquisition | None, ijk: np.ndarray, *,
            device: str | torch.device = "cpu") -> np.ndarray:
    """What the target's voxels ``ijk`` would measure under the fitted appearance (the forward model, ``A c``).

    Parameters
    ----------
    appearance : stage-2 result; its ``target_vox2t1w`` places the target's voxels in T1w world
    acquisition : the grid of ``ijk`` and its in-plane PSF; None: the fit's own (``appearance.acquisition``). The
        through-plane profile is always the one the appearance was fitted through when it is recorded (it may
        have been chosen from the data), carried in mm onto this grid
    ijk : [M, 3] int target voxel indices (they need not have been fitted: held-out voxels are predicted the same
        way)
    device : torch device of the computation

    Returns
    -------
    float32 [M, V], in the target's own units (V volumes).
    """
    if appearance.target_vox2t1w is None:
        raise ValueError("the appearance carries no target geometry (target_vox2t1w): cannot predict measurements")
    if appearance.acquisition is not None:
        acquisition = appearance.acquisition if acquisition is None else acquisition.with_profile_of(
            appearance.acquisition)
    if acquisition is None:
        raise ValueError("predict needs an acquisition model: the appearance records none")
    ijk = np.asarray(ijk, dtype=np.int64).reshape(-1, 3)
    device = torch.device(device)
    a_mat = scaffold_operator(appearance.scaffold, appearance.target_vox2t1w, ijk, acquisition, device=device)
    with torch.no_grad():
        y = a_mat.matmul(appearance.coeffs.to(device)).cpu().numpy()
    return np.asarray(appearance.intensity.invert(y), dtype=np.float32)
