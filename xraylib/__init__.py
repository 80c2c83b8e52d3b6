"""xraylib: build and honestly evaluate chest X-ray classifiers with TensorFlow/Keras.

Research software, not a diagnostic device: nothing it outputs is a medical diagnosis.

The data side (config, sources, dicom, images, manifest, split, preprocess, phantoms, sample_layouts,
synthetic) imports no TensorFlow; the model side (models, train, evaluate, explain, predict) does.
"""
__version__ = "0.1.0"

from .reporting import DISCLAIMER  # noqa: E402  (defined with the other report text)
