"""The device resolved once (``atlasgs_bids.device``) and the one quality presets table (``atlasgs_bids.presets``)."""
from __future__ import annotations

import dataclasses
import doctest

import pytest
import torch

from atlasgs_bids import device, presets
from atlasgs_bids.config import Config
from atlasgs_bids.device import resolve_device
from atlasgs_bids.errors import InputError
from atlasgs_bids.gaussians.appearance import AppearanceOptions
from atlasgs_bids.presets import APPEARANCE_PRESETS, QUALITIES


@pytest.mark.parametrize("gpu, requested, expected", [
    (False, "auto", "cpu"), (False, "cpu", "cpu"), (True, "auto", "cuda"), (True, "cuda", "cuda"), (True, "cpu", "cpu"),
])
def test_resolve_device(monkeypatch, gpu, requested, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert resolve_device(requested) == expected


def test_cuda_without_a_gpu_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: torch sees no CUDA device here; use --device cpu or auto"):
        resolve_device("cuda")


def test_presets_table_drives_appearance_options():
    assert set(APPEARANCE_PRESETS) == set(QUALITIES)
    defaults = AppearanceOptions()
    for quality in QUALITIES:
        options = AppearanceOptions.preset(quality)
        changed = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                   if getattr(options, f.name) != getattr(defaults, f.name)}
        assert changed.items() <= dict(APPEARANCE_PRESETS[quality]).items()
    assert (AppearanceOptions.preset("fast").max_iter, AppearanceOptions.preset("best").tol) == (150, 3e-6)


@pytest.mark.parametrize("field, value, word", [("quality", "ultra", "unknown quality"), ("device", "tpu", "device")])
def test_config_refuses_unknown_names(field, value, word):
    with pytest.raises(ValueError, match=word):
        Config.build(bids_dir="/b", output_dir="/o", analysis_level="participant", **{field: value})


@pytest.mark.parametrize("module", [presets, device])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
