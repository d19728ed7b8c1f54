"""Checks before a participant run writes anything: writable folders, the estimated peak memory against
``--mem-gb``, every input image read in full (before any workflow is built), and a plain explanation of a full
disk."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from atlasgs_bids.bids.layout import fusion_groups
from atlasgs_bids.config import Config, estimate_peak_memory_gb
from atlasgs_bids.errors import InputError

if TYPE_CHECKING:
    from atlasgs_bids.bids.layout import SubjectInputs

LOGGER = logging.getLogger("atlasgs")


def check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` (with parents) and write and remove a probe file in it; :class:`InputError` naming ``what``
    and ``path`` when that fails (a file in the way, a read-only file system, no permission, a full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".atlasgs-write-probe-", dir=path):
            pass
    except OSError as exc:
        raise InputError(f"{what} <{path}> is not a writable folder ({exc.strerror or exc}); choose another "
                         "location or fix its permissions") from None


def check_memory(inputs, config: Config) -> float:
    """Refuse (:class:`InputError`, before anything is written) a participant whose estimated peak memory
    (:func:`atlasgs_bids.config.estimate_peak_memory_gb`, from the image headers) exceeds ``--mem-gb``; without
    ``--mem-gb``, only warn when it exceeds the machine's memory. Returns the largest estimate (GB)."""
    import nibabel as nib
    import numpy as np

    worst, worst_label = 0.0, ""
    for si in inputs:
        try:
            t1w = nib.load(str(si.t1w))
            groups = fusion_groups(si.targets) if config.fit.fuse_stacks else [[t] for t in si.targets]
            targets = tuple(sum(int(np.prod(nib.load(str(t.path)).shape)) for t in g) for g in groups)
        except Exception as exc:  # discovery read these headers already; a file changed under us
            raise InputError(f"{si.t1w.parent}: cannot read an image header ({exc})") from None
        mm3 = float(abs(np.linalg.det(np.asarray(t1w.affine)[:3, :3])))
        need = estimate_peak_memory_gb(int(np.prod(t1w.shape[:3])), mm3, targets, config.resources.nprocs,
                                       stacks=tuple(len(g) for g in groups))
        LOGGER.debug("%s: estimated peak memory %.1f GB", si.label, need)
        if need > worst:
            worst, worst_label = need, si.label
    limit = config.resources.mem_gb
    if limit is not None and worst > limit:
        raise InputError(f"--mem-gb {limit:g}: {worst_label} needs about {worst:.1f} GB (estimated from its T1w grid "
                         f"and targets, see docs/troubleshooting.md); give it at least --mem-gb {worst * 1.1:.1f}, "
                         "or use fewer --nprocs")
    with contextlib.suppress(ValueError, OSError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        if limit is None and worst > total:
            LOGGER.warning("%s needs about %.1f GB but this machine has %.1f GB: the run may be killed", worst_label,
                           worst, total)
    return worst


def check_images(subject_inputs: SubjectInputs) -> None:
    """Read every image of one participant in full and check it (:func:`atlasgs_bids.imaging.nifti.load_nifti`:
    readable, not truncated, 3D or 4D, more than one slice per axis, finite, not all zero, a sane affine, qform and
    sform agreeing), the T1w, each target and a precomputed mask, so that a bad file is refused before its workflow
    is built. Raises :class:`InputError` naming the first bad file."""
    from atlasgs_bids.imaging.nifti import load_nifti

    si = subject_inputs
    for path in (si.t1w, *(t.path for t in si.targets), *((si.t1w_mask,) if si.t1w_mask else ())):
        img = load_nifti(path)
        if path == si.t1w and len(img.shape) == 4 and img.shape[3] > 1:
            raise InputError(f"{path}: the T1w is a 4D series ({img.shape[3]} volumes); give one 3D T1w volume")
        del img


def describe_os_error(exc: BaseException) -> str | None:
    """A one-line explanation of a full disk or a quota hit anywhere in ``exc``'s text, else ``None``."""
    import errno

    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text \
            or "Disk quota exceeded" in text:
        return ("no space left on the device (or quota exceeded) while writing the work dir or the outputs; free "
                "space, or point --work-dir at a larger file system")
    return None
