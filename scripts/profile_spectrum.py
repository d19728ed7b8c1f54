"""Exploration (not used by the app): the in-plane vs through-plane spectrum, as SMORE/ECLARE use it.

Which candidate slice profile, applied to the thick image's own in-plane lines (1 mm) and sampled at the slice
spacing, reproduces the power spectrum of its through-plane lines? Score: SD over frequency of the log power ratio
(shape mismatch up to a scale), lines of 16 samples inside the brain mask, Hann window. Figures in
docs/bench/profile.md (section 4). Full MNI152 volume, noiseless; about a minute.

Usage: ``OMP_NUM_THREADS=1 python scripts/profile_spectrum.py``
"""
import numpy as np
from scipy.ndimage import convolve1d
from atlasgs_bids.bench import cases
from atlasgs_bids.imaging.acquisition import FWHM_TO_SIGMA

def kernel(kind, width_mm, edge_mm=0.0, dx=1.0):
    x = np.arange(-30, 31) * dx
    fine = np.linspace(-0.5, 0.5, 21)  # integrate over the 1 mm voxel
    def prof(u):
        if kind == "gaussian":
            s = width_mm * FWHM_TO_SIGMA
            return np.exp(-0.5 * (u / s) ** 2)
        out = ((u >= -width_mm / 2) & (u <= width_mm / 2)).astype(float)
        if edge_mm > 0:
            s = edge_mm * FWHM_TO_SIGMA
            g = np.exp(-0.5 * (np.arange(-40, 41) * 0.05 / s) ** 2)
            uu = np.arange(-60, 60.001, 0.05)
            b = ((uu >= -width_mm / 2) & (uu <= width_mm / 2)).astype(float)
            bb = np.convolve(b, g / g.sum(), mode="same")
            return np.interp(u, uu, bb)
        return out
    k = np.array([prof(xi + fine).mean() for xi in x])
    return k / k.sum()

def spectrum(lines, n):
    w = np.hanning(n)
    lines = lines - lines.mean(1, keepdims=True)
    return (np.abs(np.fft.rfft(lines * w, axis=1)) ** 2).mean(0)[1:]

def run(thick, factor, mask_thick):
    n_z = thick.shape[2]
    # through-plane lines: full brain columns (z-runs of length L inside the mask)
    L = min(16, n_z)
    zl = []
    for i in range(thick.shape[0]):
        for j in range(thick.shape[1]):
            m = mask_thick[i, j]
            for z0 in range(0, n_z - L + 1, L // 2):
                if m[z0:z0 + L].all():
                    zl.append(thick[i, j, z0:z0 + L])
    pz = spectrum(np.array(zl), L)
    cands = {"gaussian": ("gaussian", 1.0, 0), "box": ("box", 1.0, 0), "box-soft": ("box", 1.0, 0.5),
             "gaussian-0.8": ("gaussian", 0.8, 0), "gaussian-1.25": ("gaussian", 1.25, 0)}
    out = {}
    for name, (kind, w, e) in cands.items():
        k = kernel(kind, w * factor, e * factor)
        blurred = convolve1d(thick.astype(float), k, axis=0, mode="constant")
        xl = []
        for n in range(n_z):
            for j in range(thick.shape[1]):
                for phase in range(factor):
                    seg = blurred[phase::factor, j, n]
                    mm = mask_thick[phase::factor, j, n]
                    for x0 in range(0, len(seg) - L + 1, L // 2):
                        if mm[x0:x0 + L].all():
                            xl.append(seg[x0:x0 + L])
        px = spectrum(np.array(xl), L)
        d = np.log(px) - np.log(pz)
        out[name] = float(np.std(d))  # shape mismatch up to a scale
    return out

sub = cases.load_subject("/work/shared/data/mni152-hcp")
for factor in (3, 5):
    n = sub.shape[2] // factor
    for deg in ("gaussian", "atlasgs", "hardbox"):
        if deg == "hardbox":
            thick = sub.t2w[:, :, :n * factor].reshape(*sub.shape[:2], n, factor).mean(-1)
            mt = sub.mask[:, :, :n * factor].reshape(*sub.shape[:2], n, factor).all(-1)
        else:
            c = cases.make_case(sub, factor, deg)
            thick = c.thick
            first = factor // 2 if deg == "gaussian" else 0
            if deg == "gaussian":
                mt = sub.mask[:, :, first::factor][:, :, :thick.shape[2]]
            else:
                mt = sub.mask[:, :, :n * factor].reshape(*sub.shape[:2], n, factor).all(-1)
        r = run(thick, factor, mt)
        best = min(r, key=r.get)
        print(f"x{factor} {deg}: best {best}", {k: round(v, 3) for k, v in r.items()}, flush=True)
