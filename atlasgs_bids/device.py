"""The torch device a run uses, resolved once from ``--device`` (``auto``, ``cuda`` or ``cpu``)."""
from __future__ import annotations

from atlasgs_bids.errors import InputError

#: ``--device`` choices: ``auto`` is CUDA when torch sees a GPU, else the CPU.
DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")


def resolve_device(requested: str) -> str:
    """``"cuda"`` or ``"cpu"`` for a requested device.

    ``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu`` stays ``cpu``. ``cuda`` on a machine
    where torch sees no GPU is an :class:`~atlasgs_bids.errors.InputError` (the user's to fix: exit code 2), raised
    before any work starts rather than deep inside a fit.

    >>> resolve_device("cpu")
    'cpu'
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    atlasgs_bids.errors.InputError: unknown device 'tpu': use one of auto, cuda, cpu
    """
    if requested not in DEVICES:
        raise InputError(f"unknown device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    import torch  # here, not at the top: importing this module must stay cheap (the CLI parser uses DEVICES)

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise InputError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    return "cpu"
