"""xraylib: build and honestly evaluate chest X-ray classifiers with TensorFlow/Keras.

Research software, not a diagnostic device: nothing it outputs is a medical diagnosis.

The data side (config, sources, dicom, images, manifest, split, preprocess, parallel, phantoms, sample_layouts,
synthetic) imports no TensorFlow; the model side (models, train, evaluate, explain, predict) does.
"""
__version__ = "0.1.0"
#: The distribution name (``pip install`` it from a clone: see the README). Only this package has this attribute:
#: the PyPI package "xraylib" is an unrelated X-ray physics library whose ``import xraylib`` also succeeds.
DISTRIBUTION = "xraylib-cxr"

from .reporting import DISCLAIMER  # noqa: E402  (defined with the other report text)
