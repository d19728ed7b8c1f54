"""Save and load a scaffold: arrays in ``.npz``, provenance in a ``.json`` beside it (same stem)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from atlasgs_bids.atomic import atomic_path, atomic_write_bytes
from atlasgs_bids.gaussians.scaffold import Scaffold
from atlasgs_bids.version import __version__

#: Bumped whenever the arrays or their meaning change; older files are refused with a clear message.
FORMAT_VERSION = 1
_ARRAYS = ("means", "quats", "log_scales", "amplitudes", "t1_values")


def save_scaffold(scaffold: Scaffold, path: str | Path) -> tuple[Path, Path]:
    """Write ``path`` (.npz: float32 arrays + packed mask) and ``path`` with ``.json`` (meta), atomically.

    Returns the two paths written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"scaffold files end in .npz, got {path.name}")
    arrays = {name: getattr(scaffold, name).detach().cpu().numpy().astype(np.float32) for name in _ARRAYS}
    arrays["mask_bits"] = np.packbits(scaffold.mask.astype(bool).reshape(-1))
    arrays["mask_shape"] = np.asarray(scaffold.mask.shape, dtype=np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    meta = dict(scaffold.meta)
    meta.pop("loss_history", None)  # long; the figure-of-merit summary stays
    doc = {"FormatVersion": FORMAT_VERSION, "SoftwareVersion": __version__, "NGaussians": scaffold.n_gaussians, "Meta": meta}
    json_path = path.with_suffix(".json")
    atomic_write_bytes(json_path, json.dumps(doc, indent=2).encode())
    return path, json_path


def load_scaffold(path: str | Path) -> Scaffold:
    """Read a scaffold written by :func:`save_scaffold`; raises ValueError naming the file when it is unusable."""
    path = Path(path)
    json_path = path.with_suffix(".json")
    try:
        doc = json.loads(json_path.read_text())
        with np.load(path) as data:
            arrays = {name: torch.as_tensor(data[name]) for name in _ARRAYS}
            shape = tuple(int(s) for s in data["mask_shape"])
            mask = np.unpackbits(data["mask_bits"], count=int(np.prod(shape))).astype(bool).reshape(shape)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the scaffold {path}: {exc}") from exc
    if doc.get("FormatVersion") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has scaffold format {doc.get('FormatVersion')}, this version reads {FORMAT_VERSION}: refit it"
        )
    n = arrays["means"].shape[0]
    if any(arrays[k].shape[0] != n for k in _ARRAYS):
        raise ValueError(f"{path}: the scaffold's arrays disagree on the number of Gaussians")
    return Scaffold(mask=mask, meta=doc["Meta"], **arrays)
