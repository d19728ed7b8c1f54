"""The package version, read from the repository's single ``version`` file when present."""
from importlib import metadata as _metadata
from pathlib import Path as _Path


def _read_version() -> str:
    # A source checkout carries the ``version`` file at its root; an installed wheel carries the metadata.
    here = _Path(__file__).resolve().parent.parent / "version"
    if here.is_file():
        return here.read_text().strip()
    try:
        return _metadata.version("atlasgs-bids")
    except _metadata.PackageNotFoundError:  # pragma: no cover - only in a broken install
        return "0+unknown"


__version__ = _read_version()
