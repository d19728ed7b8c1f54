"""Quality presets: the names every layer accepts (CLI, config, Nipype interfaces, bench) and what each changes.

This module imports nothing from the package, so any layer may read it. Stage 1 with the default lattice geometry
has no settings (one Gaussian per T1w voxel, nothing fitted), so a preset changes stage 2 only.

>>> QUALITIES
('fast', 'default', 'best')
>>> appearance_overrides("fast")
{'max_iter': 150, 'tol': 0.0001, 'noise_lam': True}
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

#: Quality preset names, fastest first (``--quality`` choices; ``default`` is the CLI's default).
QUALITIES: tuple[str, ...] = ("fast", "default", "best")

#: Per-quality overrides of :class:`~atlasgs_bids.gaussians.appearance.AppearanceOptions` (stage 2); fields not
#: named keep the dataclass defaults. ``max_iter``: conjugate-gradient iterations; ``tol``: relative residual at
#: which CG stops; ``tune``: lambda chosen on held-out slices; ``noise_lam``: lambda scaled by the target's noise.
APPEARANCE_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "fast": MappingProxyType({"max_iter": 150, "tol": 1e-4, "noise_lam": True}),
    "default": MappingProxyType({"tune": True, "noise_lam": True}),
    "best": MappingProxyType({"max_iter": 1000, "tol": 3e-6, "tune": True, "noise_lam": True}),
})


def check_quality(quality: str) -> str:
    """``quality`` when it is one of :data:`QUALITIES`, else a ``ValueError`` naming the choices.

    >>> check_quality("ultra")
    Traceback (most recent call last):
    ...
    ValueError: unknown quality 'ultra': use one of fast, default, best
    """
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}: use one of {', '.join(QUALITIES)}")
    return quality


def appearance_overrides(quality: str) -> dict[str, Any]:
    """The :class:`AppearanceOptions` keyword arguments of preset ``quality`` (a fresh dict)."""
    return dict(APPEARANCE_PRESETS[check_quality(quality)])
