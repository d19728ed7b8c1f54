"""Sub-voxel rigid refinement through the target's acquisition model (slice profile and in-plane PSF).

Frames
------
Points are **world mm RAS**. ``target2t1w`` maps a point of the target's world (its own NIfTI affine) to the same
anatomical point of the T1w's world, as in :mod:`atlasgs_bids.imaging.registration`.

Model
-----
Mutual information on a thick-slice target interpolated onto the T1w grid does not see how a thick slice measured
the anatomy: it compares the T1w with an interpolation. Here the comparison goes the other way, as in stage 2: the
T1w is pushed through the target's acquisition model and compared with the target's own voxels. Each target voxel
``v`` (centre ``x_v``, target world) measures

    y_v ~ sum_q w_q * sum_k beta_k(x_v) B_k( t1(T(x_v + d_q)) )

where ``d_q, w_q`` is a quadrature of the through-plane slice profile (Gauss-Hermite for a Gaussian profile, per
sub-slice for a box), ``t1`` is the T1w blurred by the in-plane PSF (less the T1w's own voxel), ``B_k`` are hat
functions over the T1w intensity (a free, piecewise-linear T1w -> target intensity map) and ``beta_k(x) =
sum_j beta_kj P_j(x)`` lets that map vary linearly across the field of view (a bias field). For a fixed transform
the model is linear in ``beta`` (solved by least squares, the variable projection); the six rigid parameters are
refined by Gauss-Newton (Levenberg-Marquardt damping) on the robust (Huber, IRLS) misfit, coarse to fine. The
appearance is a T1w intensity map rather than a stage-2 fit, so the refinement costs seconds and does not depend on
an appearance that was itself fitted under the wrong transform (see docs/adr/0006-registration-refinement.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA, Acquisition

__all__ = ["RefineOptions", "RefineResult", "refine_rigid", "rigid_update", "surface_points",
           "max_displacement_mm", "brain_centre", "dilate_mm"]


@dataclass(frozen=True)
class RefineOptions:
    """Settings of :func:`refine_rigid`.

    levels_mm : extra isotropic blur (mm, sigma) of each coarse-to-fine level; the last should be 0
    max_iter : Gauss-Newton iterations per level (all IRLS rounds together)
    max_voxels : target voxels used (a seeded, spatially uniform subsample of those near the brain)
    n_bins : hat functions over the T1w intensity (the intensity map's knots)
    bias_order : 0 (one global map), 1 or 2 (the map varies linearly / quadratically across the field of view)
    mask_dilate_mm : the brain mask is dilated by this much to choose voxels (the brain's edge counts)
    huber : Huber threshold in robust standard deviations (1.4826 MAD of the residuals)
    profile_points : Gauss-Hermite points per (sub-)slice profile; 0 chooses them so that they are about one T1w
        voxel apart (5 to 21): too few points alias the T1w's detail into a bias (measured: 5 points on 5 mm
        slices, 0.23 mm; 15 points, 0.08 mm)
    interp_order : spline order of the T1w sampling (1 linear, 3 cubic: less grid-position bias, slower)
    tol_mm : stop a level when the step moves no brain point by more than this (mm)
    seed : subsampling seed
    """

    levels_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    max_iter: int = 30
    max_voxels: int = 30000
    n_bins: int = 16
    bias_order: int = 2
    mask_dilate_mm: float = 3.0
    huber: float = 2.0
    tol_mm: float = 0.01
    interp_order: int = 3
    profile_points: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.levels_mm or min(self.levels_mm) < 0:
            raise ValueError(f"RefineOptions.levels_mm must be non-negative blurs, got {self.levels_mm}")
        if self.max_iter < 1 or self.max_voxels < 100 or self.n_bins < 2 or self.bias_order not in (0, 1, 2):
            raise ValueError("RefineOptions needs max_iter >= 1, max_voxels >= 100, n_bins >= 2, bias_order 0, 1 or 2")


@dataclass(frozen=True, eq=False)
class RefineResult:
    """Result of :func:`refine_rigid`.

    target2t1w : (4, 4) refined map target world mm RAS -> T1w world mm RAS
    initial : (4, 4) the map it started from
    misfit_before, misfit_after : robust relative RMS misfit ``sqrt(sum w r^2 / sum w y^2)`` of the acquisition model
        at the initial and the refined transform (finest level, intensity map re-fitted at each)
    moved_mm : largest displacement between ``initial`` and ``target2t1w`` over the brain surface (mm)
    moved_deg : rotation angle between the two (degrees)
    iterations : Gauss-Newton iterations per level
    n_voxels : target voxels used
    seconds : wall-clock time
    """

    target2t1w: np.ndarray
    initial: np.ndarray
    misfit_before: float
    misfit_after: float
    moved_mm: float
    moved_deg: float
    iterations: list[int] = field(default_factory=list)
    n_voxels: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (matrices as nested lists)."""
        return {"initial_target2t1w": np.asarray(self.initial).tolist(),
                "refined_target2t1w": np.asarray(self.target2t1w).tolist(),
                "misfit_before": self.misfit_before, "misfit_after": self.misfit_after,
                "moved_mm": self.moved_mm, "moved_deg": self.moved_deg, "iterations": list(self.iterations),
                "n_voxels": self.n_voxels, "seconds": self.seconds}


def rigid_update(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(4, 4) rigid map of world mm: rotation by the rotation vector ``params[:3]`` (radians) about ``centre`` (mm),
    then translation by ``params[3:]`` (mm)."""
    omega = np.asarray(params[:3], dtype=np.float64)
    angle = float(np.linalg.norm(omega))
    rot = np.eye(3)
    if angle > 0:
        k = omega / angle
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * (kx @ kx)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre - rot @ centre + np.asarray(params[3:], dtype=np.float64)
    return out


def surface_points(mask: np.ndarray, affine: np.ndarray, *, max_points: int = 20000) -> np.ndarray:
    """World mm RAS coordinates [P, 3] of the brain mask's boundary voxels (a uniform subsample of at most
    ``max_points``)."""
    mask = np.asarray(mask, dtype=bool)
    edge = mask & ~ndimage.binary_erosion(mask)
    ijk = np.argwhere(edge if edge.any() else mask)
    step = max(1, int(np.ceil(len(ijk) / max_points)))
    return nib.affines.apply_affine(np.asarray(affine, float), ijk[::step])


def max_displacement_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Largest distance (mm) between where two maps ``a`` and ``b`` (target -> T1w world) say the T1w points
    ``points`` [P, 3] sit in the target world: ``max |a^-1 p - b^-1 p|``."""
    pa = nib.affines.apply_affine(np.linalg.inv(np.asarray(a, float)), points)
    pb = nib.affines.apply_affine(np.linalg.inv(np.asarray(b, float)), points)
    return float(np.linalg.norm(pa - pb, axis=1).max()) if len(points) else 0.0


def dilate_mm(mask: np.ndarray, zooms: np.ndarray, radius_mm: float) -> np.ndarray:
    """``mask`` (bool) dilated by a ball of ``radius_mm`` (mm) on a grid of voxel sizes ``zooms`` (mm); unchanged
    for a radius <= 0."""
    mask = np.asarray(mask, dtype=bool)
    if radius_mm <= 0:
        return mask
    zooms = np.asarray(zooms, dtype=float)
    grid = np.ogrid[tuple(slice(-n, n + 1) for n in np.ceil(radius_mm / zooms).astype(int))]
    ball = sum((g * z) ** 2 for g, z in zip(grid, zooms)) <= radius_mm ** 2
    return ndimage.binary_dilation(mask, structure=ball)


def brain_centre(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centre of the brain mask, world mm RAS."""
    return nib.affines.apply_affine(np.asarray(affine, float), np.argwhere(mask).mean(axis=0))


def _profile_quadrature(acq: Acquisition, t1_vox_mm: float, extra_sigma_mm: float,
                        points: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Through-plane quadrature of the slice profile: offsets (mm along the slice axis) and weights (sum 1).

    The T1w volume already carries its own voxel PSF and is blurred isotropically by the in-plane PSF (and the
    level's extra blur); the part of each sub-slice's through-plane width beyond those is integrated here by a
    Gauss-Hermite rule (``points``; 0: automatic), so the model's total through-plane PSF is the target's.
    """
    zooms = acq.zooms
    ax = acq.slice_axis
    sub_off, sub_w, sub_fwhm = acq.sub_slices()
    iso2 = _inplane_sigma_mm(acq, t1_vox_mm) ** 2 + extra_sigma_mm ** 2 + (t1_vox_mm * FWHM_TO_SIGMA) ** 2
    sigma = np.sqrt(max((sub_fwhm[ax] * zooms[ax] * FWHM_TO_SIGMA) ** 2 - iso2, 0.0))
    if points <= 0:
        points = int(np.clip(2 * np.ceil(3.0 * sigma / max(t1_vox_mm, 1e-6)) + 1, 5, 21))
    gh_x, gh_w = np.polynomial.hermite_e.hermegauss(points)  # probabilists' Gauss-Hermite: N(0, 1) moments
    gh_w = gh_w / gh_w.sum()
    offs = np.concatenate([o * zooms[ax] + gh_x * sigma for o in sub_off])
    weights = np.concatenate([w * gh_w for w in sub_w])
    return offs, weights


def _inplane_sigma_mm(acq: Acquisition, t1_vox_mm: float) -> float:
    """Isotropic blur (sigma, mm) that takes the T1w (its own voxel PSF) to the target's in-plane PSF."""
    zooms = acq.zooms
    fw = [acq.fwhm_vox[a] * zooms[a] for a in range(3) if a != acq.slice_axis]
    return float(np.sqrt(max(float(np.mean(fw)) ** 2 - t1_vox_mm ** 2, 0.0)) * FWHM_TO_SIGMA)


class _Problem:
    """The fixed data of one refinement: target voxels, their values, the T1w volume and the quadrature."""

    def __init__(self, t1: np.ndarray, t1_affine: np.ndarray, mask: np.ndarray, y: np.ndarray,
                 acq: Acquisition, init: np.ndarray, opts: RefineOptions) -> None:
        self.opts = opts
        self.acq = acq
        self.t1_affine = np.asarray(t1_affine, float)
        self.t1_inv = np.linalg.inv(self.t1_affine)
        self.t1_vox = float(nib.affines.voxel_sizes(self.t1_affine).min())
        inside = dilate_mm(mask, nib.affines.voxel_sizes(self.t1_affine), opts.mask_dilate_mm)
        lo, hi = np.percentile(t1[mask], [0.5, 99.5])
        self.t1n = np.clip((t1 - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
        # target voxels whose centre falls in the dilated brain under the initial transform
        ijk = np.indices(acq.shape).reshape(3, -1).T
        world = nib.affines.apply_affine(np.asarray(init, float) @ acq.affine, ijk)
        t1ijk = np.rint(nib.affines.apply_affine(self.t1_inv, world)).astype(int)
        ok = np.all((t1ijk >= 0) & (t1ijk < np.array(mask.shape)), axis=1)
        ok[ok] = inside[tuple(t1ijk[ok].T)]
        ijk = ijk[ok]
        if len(ijk) < 100:
            raise ValueError("fewer than 100 target voxels fall in the brain under the initial transform")
        rng = np.random.default_rng(opts.seed)
        if len(ijk) > opts.max_voxels:
            ijk = ijk[np.sort(rng.choice(len(ijk), opts.max_voxels, replace=False))]
        self.ijk = ijk
        self.y_full = y
        self.x_target = nib.affines.apply_affine(acq.affine, ijk)  # target world mm
        self.axis_dir = acq.affine[:3, acq.slice_axis] / acq.zooms[acq.slice_axis]
        # bias basis: 1 and the target-world coordinates, scaled to about [-1, 1]
        c = self.x_target.mean(axis=0)
        s = max(float(np.abs(self.x_target - c).max()), 1.0)
        u = (self.x_target - c) / s
        terms = [np.ones(len(ijk))]
        if opts.bias_order >= 1:
            terms += [u[:, a] for a in range(3)]
        if opts.bias_order >= 2:
            terms += [u[:, a] * u[:, b] for a in range(3) for b in range(a, 3)]
        self.poly = np.stack(terms, axis=1)

    def set_level(self, sigma_mm: float) -> None:
        """Prepare the blurred T1w, its gradient and the blurred data for one level (extra blur ``sigma_mm``)."""
        acq, zooms_t1 = self.acq, nib.affines.voxel_sizes(self.t1_affine)
        s_ip = np.sqrt(_inplane_sigma_mm(acq, self.t1_vox) ** 2 + sigma_mm ** 2)
        vol = ndimage.gaussian_filter(self.t1n, s_ip / zooms_t1, truncate=3.0) if s_ip > 0 else self.t1n
        grads = np.gradient(vol)  # per T1w voxel index
        # world gradient = inv(A3)^T @ index gradient
        a3inv = np.linalg.inv(self.t1_affine[:3, :3])
        grads = [sum(a3inv[i, w] * grads[i] for i in range(3)).astype(np.float32) for w in range(3)]
        if self.opts.interp_order > 1:  # spline coefficients once per level, so sampling needs no prefilter
            vol = ndimage.spline_filter(vol, self.opts.interp_order, output=np.float32)
            grads = [ndimage.spline_filter(g, self.opts.interp_order, output=np.float32) for g in grads]
        self.vol, self.grads = vol, grads
        y = self.y_full
        if sigma_mm > 0:  # blur the data in plane by the same extra amount (through plane it is already coarse)
            sig = np.array([sigma_mm / z for z in acq.zooms])
            sig[acq.slice_axis] = 0.0
            y = ndimage.gaussian_filter(y, sig, truncate=3.0)
        self.y = y[tuple(self.ijk.T)].astype(np.float64)
        offs, w = _profile_quadrature(acq, self.t1_vox, sigma_mm, self.opts.profile_points)
        self.offs, self.w = offs, w

    def points(self, m: np.ndarray) -> np.ndarray:
        """Quadrature points [V, Q, 3] in T1w world for the map ``m`` (target -> T1w world)."""
        base = self.x_target[:, None, :] + self.offs[None, :, None] * self.axis_dir[None, None, :]
        return base @ m[:3, :3].T + m[:3, 3]

    def _sample(self, vol: np.ndarray, pts: np.ndarray) -> np.ndarray:
        vox = pts.reshape(-1, 3) @ self.t1_inv[:3, :3].T + self.t1_inv[:3, 3]
        return ndimage.map_coordinates(vol, vox.T, order=self.opts.interp_order, mode="nearest",
                                       prefilter=False).reshape(pts.shape[:-1])

    def features(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hat-function design at intensities ``s`` [V, Q]: features [V, K*J], and each point's knot interval [V, Q]
        (for the derivatives)."""
        k = self.opts.n_bins
        u = s * (k - 1)
        i0 = np.clip(np.floor(u).astype(int), 0, k - 2)
        f = u - i0
        v, q = s.shape
        flat = (np.arange(v)[:, None] * k + i0).ravel()
        hat = (np.bincount(flat, weights=((1 - f) * self.w[None, :]).ravel(), minlength=v * k)
               + np.bincount(flat + 1, weights=(f * self.w[None, :]).ravel(), minlength=v * k)).reshape(v, k)
        design = (hat[:, :, None] * self.poly[:, None, :]).reshape(v, -1)
        return design, i0

    def solve_map(self, design: np.ndarray, weights: np.ndarray, rhs: np.ndarray | None = None) -> np.ndarray:
        """Weighted least squares of ``rhs`` (default the data) on the design: the intensity map's coefficients."""
        sw = np.sqrt(weights)
        dw = design * sw[:, None]
        a = dw.T @ dw
        a += 1e-6 * max(float(np.trace(a)) / len(a), 1e-12) * np.eye(len(a))  # empty knots stay defined
        rhs = self.y if rhs is None else rhs
        return np.linalg.solve(a, dw.T @ (rhs * (sw if rhs.ndim == 1 else sw[:, None])))

    def robust_weights(self, r: np.ndarray) -> np.ndarray:
        scale = 1.4826 * float(np.median(np.abs(r - np.median(r)))) + 1e-12
        t = self.opts.huber * scale
        a = np.abs(r)
        return np.where(a <= t, 1.0, t / np.maximum(a, 1e-12))

    def evaluate(self, m: np.ndarray, weights: np.ndarray | None = None):
        pts = self.points(m)
        s = self._sample(self.vol, pts)
        design, i0 = self.features(s)
        w = np.ones(len(self.y)) if weights is None else weights
        beta = self.solve_map(design, w)
        r = self.y - design @ beta
        return pts, design, i0, beta, r

    def cost(self, r: np.ndarray, w: np.ndarray) -> float:
        return float(np.sum(w * r ** 2))

    def jacobian(self, pts: np.ndarray, i0: np.ndarray, beta: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """d(prediction)/d(params) [V, 6]: params = rotation vector about ``centre`` (rad), translation (mm),
        applied on the T1w side."""
        k = self.opts.n_bins
        b = beta.reshape(k, -1)  # [K, J]
        bv = self.poly @ b.T  # [V, K]: the intensity map's knot values at each voxel
        slope = (np.take_along_axis(bv, i0 + 1, axis=1) - np.take_along_axis(bv, i0, axis=1)) * (k - 1)  # [V, Q]
        g = np.stack([self._sample(gw, pts) for gw in self.grads], axis=-1)  # [V, Q, 3] world gradient
        dpred_dp = (self.w[None, :, None] * slope[:, :, None]) * g  # [V, Q, 3]
        jt = dpred_dp.sum(axis=1)
        jr = np.cross(pts - centre, dpred_dp).sum(axis=1)
        return np.concatenate([jr, jt], axis=1)


def refine_rigid(
    t1w: nib.spatialimages.SpatialImage,
    brain_mask: nib.spatialimages.SpatialImage,
    target: nib.spatialimages.SpatialImage,
    target2t1w: np.ndarray,
    acquisition: Acquisition | None = None,
    options: RefineOptions | None = None,
) -> RefineResult:
    """Refine a rigid map target -> T1w by matching the T1w, pushed through the target's acquisition model, to the
    target's own voxels (see the module docstring).

    Parameters
    ----------
    t1w : the T1w, (I, J, K), affine voxel -> T1w world mm RAS
    brain_mask : brain mask on the T1w grid (non-zero = brain): chooses the target voxels that count
    target : the target's 3D reference volume on its own grid, affine voxel -> target world mm RAS
    target2t1w : (4, 4) initial map target world mm RAS -> T1w world mm RAS (e.g. from antspyx)
    acquisition : the target's PSF and slice profile; default from its header (slice thickness = spacing)
    options : :class:`RefineOptions`

    Returns
    -------
    :class:`RefineResult`
    """
    t0 = time.perf_counter()
    opts = options or RefineOptions()
    init = np.asarray(target2t1w, dtype=np.float64)
    y = np.asarray(target.get_fdata(dtype=np.float32))
    if y.ndim == 4 and y.shape[3] == 1:
        y = y[..., 0]
    if y.ndim != 3:
        raise ValueError(f"refine_rigid needs a 3D target reference, got shape {y.shape}")
    acq = acquisition or Acquisition.from_geometry(target.affine, y.shape)
    t1 = np.asarray(t1w.get_fdata(dtype=np.float32))
    mask = np.asarray(brain_mask.dataobj).reshape(t1.shape) > 0
    prob = _Problem(t1, t1w.affine, mask, y, acq, init, opts)
    centre = brain_centre(mask, t1w.affine)
    surf = surface_points(mask, t1w.affine)

    current = init.copy()
    iterations: list[int] = []
    for level in opts.levels_mm:
        prob.set_level(level)
        _, _, _, _, r = prob.evaluate(current)
        n_it = 0
        for _reweight in range(3):  # IRLS: Huber weights held fixed while Gauss-Newton converges, then renewed
            w = prob.robust_weights(r)
            pts, design, i0, beta, r = prob.evaluate(current, w)
            cost = prob.cost(r, w)
            damping, first = 1e-3, True
            while n_it < opts.max_iter:
                n_it += 1
                jac = prob.jacobian(pts, i0, beta, centre)
                # variable projection (Kaufman): the intensity map re-fits to any change, so only the part of
                # the Jacobian it cannot explain moves the transform
                jac = jac - design @ prob.solve_map(design, w, jac)
                jw = jac * w[:, None]
                h, g = jac.T @ jw, jw.T @ r
                accepted = False
                for _ in range(8):  # Levenberg-Marquardt
                    step = np.linalg.solve(h + damping * np.diag(np.diag(h) + 1e-12), g)
                    cand = rigid_update(step, centre) @ current
                    c_pts, c_design, c_i0, c_beta, c_r = prob.evaluate(cand, w)
                    c_cost = prob.cost(c_r, w)
                    if c_cost < cost:
                        accepted = True
                        damping = max(damping / 3.0, 1e-6)
                        break
                    damping *= 4.0
                if not accepted:
                    break
                moved = max_displacement_mm(cand, current, surf)
                current, cost = cand, c_cost
                pts, design, i0, beta, r = c_pts, c_design, c_i0, c_beta, c_r
                if moved < opts.tol_mm:
                    break
                first = False
            if first or n_it >= opts.max_iter:  # the renewed weights moved nothing: converged
                break
        iterations.append(n_it)
    before = _relative_misfit(prob, init)
    after = _relative_misfit(prob, current)
    rel = np.linalg.inv(init) @ current
    return RefineResult(
        target2t1w=current, initial=init, misfit_before=before, misfit_after=after,
        moved_mm=max_displacement_mm(current, init, surf),
        moved_deg=float(np.degrees(np.arccos(np.clip((np.trace(rel[:3, :3]) - 1) / 2, -1, 1)))),
        iterations=iterations, n_voxels=len(prob.ijk), seconds=time.perf_counter() - t0)


def _relative_misfit(prob: _Problem, m: np.ndarray) -> float:
    """Robust relative RMS misfit of the acquisition model at map ``m`` (on the current level)."""
    _, _, _, _, r = prob.evaluate(m)
    w = prob.robust_weights(r)
    _, _, _, _, r = prob.evaluate(m, w)
    return float(np.sqrt(np.sum(w * r ** 2) / max(np.sum(w * prob.y ** 2), 1e-12)))
