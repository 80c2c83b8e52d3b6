"""Guidance where Colab users get lost: the CPU-only warning, the training curves' AUC panels."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from xraylib import config, plots, train


def test_device_warning_in_colab_without_gpu_says_the_fix_first(monkeypatch):
    monkeypatch.setattr(config, "in_colab", lambda: True)
    text = train.device_warning(gpus=[])
    assert text is not None
    first = text.splitlines()[0]
    assert first.startswith("Choose a GPU: Runtime > Change runtime type > T4 GPU")
    assert "only a CPU" in text and "hours" in text
    assert len(text.splitlines()) <= 2


def test_device_warning_outside_colab_is_softer_and_none_with_a_gpu(monkeypatch):
    monkeypatch.setattr(config, "in_colab", lambda: False)
    soft = train.device_warning(gpus=[])
    assert soft is not None and "Runtime" not in soft and "CPU" in soft
    assert train.device_warning(gpus=["/physical_device:GPU:0"]) is None
    monkeypatch.setattr(config, "in_colab", lambda: True)
    assert train.device_warning(gpus=["/physical_device:GPU:0"]) is None
