"""Grad-CAM heatmaps for every backbone :func:`xraylib.models.build_model` offers, and how to check them.

Grad-CAM (Selvaraju et al., ICCV 2017) asks which parts of the last convolutional feature map
raised the score of a class: the gradients of the class score with respect to that map,
averaged over space, weight its channels; the ReLU of the weighted sum, upsampled to the
image, is the heatmap. A heatmap is a hint where the model looked, not a finding: check it
(:func:`heat_share_inside` with :func:`lung_field_mask`) before trusting it, because a model
that learned a shortcut (a marker, a text label, the collimation) lights up the shortcut.

Only :func:`find_last_conv_layer` and :func:`gradcam` need TensorFlow; they import it when
called, so :func:`overlay`, :func:`heat_share_inside` and :func:`lung_field_mask` stay usable
(and :mod:`xraylib.plots` stays importable) without loading it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from .errors import ConfigError, ModelError
from .views import lung_field_mask  # the lung fields' geometry lives with the views that hide them

if TYPE_CHECKING:
    import keras

__all__ = ["find_last_conv_layer", "gradcam", "overlay", "heat_share_inside", "lung_field_mask"]

# Final-layer activations whose input is the "score before the output nonlinearity" Grad-CAM wants.
_SCORE_ACTIVATIONS = ("softmax", "sigmoid", "linear")


# --------------------------------------------------------------------------------------------
# Which layer


def _four_d_layers(model: "keras.Model") -> list[str]:
    """Names of the layers with one 4-D output ``(N, H, W, C)``, in the model's (topological) order,
    up to the head: the candidates for Grad-CAM."""
    import keras

    names = []
    for layer in model.layers:
        if layer.name == "head_pool":
            break
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # a layer used more than once has no single output
            continue
        if not isinstance(output, (list, tuple)) and len(output.shape) == 4:
            names.append(layer.name)
    return names


def _backbone_name(model: "keras.Model") -> str | None:
    """The xraylib backbone of a model: from its spec (freshly built) or its name ``xraylib_<backbone>`` (loaded)."""
    from .models import BACKBONES

    spec = getattr(model, "xraylib_spec", None)
    if spec is not None and spec.backbone in BACKBONES:
        return spec.backbone
    name = model.name.removeprefix("xraylib_")
    return name if name in BACKBONES else None


def find_last_conv_layer(model: "keras.Model") -> str:
    """Name of the backbone's last feature map: the layer Grad-CAM differentiates with respect to.

    For an xraylib model this is the last conv layer listed in :data:`xraylib.models.BACKBONES`
    (``block5_conv3``, ``conv5_block3_out``, ``relu``, ``out_relu``, ``conv_pw_13_relu``,
    ``last_conv``). For any other model: the last layer with a 4-D output before ``head_pool``
    (or before the end), preferring a name from ``BACKBONES``. Raises :class:`ModelError` if
    the model has no 4-D layer.
    """
    from .models import BACKBONES

    candidates = _four_d_layers(model)
    if not candidates:
        raise ModelError(f"model {model.name!r} has no layer with a 4-D (N, H, W, C) output: Grad-CAM needs a "
                         "convolutional feature map")
    backbone = _backbone_name(model)
    if backbone is not None and BACKBONES[backbone][1] in candidates:
        return BACKBONES[backbone][1]
    # The small CNN's last conv is followed by a max-pooling layer; its conv output has twice
    # the resolution of the pooled map, so a listed name beats "the last 4-D layer".
    known = {entry[1] for entry in BACKBONES.values()}
    listed = [name for name in candidates if name in known]
    return listed[-1] if listed else candidates[-1]


def _conv_layer(model: "keras.Model", layer_name: str | None):
    if layer_name is None:
        layer_name = find_last_conv_layer(model)
    candidates = _four_d_layers(model)
    if layer_name not in candidates:
        exists = any(layer.name == layer_name for layer in model.layers)
        why = "has no 4-D (N, H, W, C) output" if exists else "is not a layer of this model"
        shown = candidates[-12:]
        raise ModelError(
            f"layer_name {layer_name!r} {why}; Grad-CAM needs a convolutional feature map. "
            f"The last 4-D layers of {model.name!r} are {shown} (of {len(candidates)}); "
            f"leave layer_name=None for {find_last_conv_layer(model)!r}"
        )
    return model.get_layer(layer_name)


def _score_source(model: "keras.Model"):
    """(tensor, final Dense layer or None): what to differentiate.

    Grad-CAM uses the class score before the softmax: the probability saturates near 0 and 1,
    and its gradient then says as much about the other classes as about this one. When the
    model ends in a Dense layer with softmax/sigmoid/linear activation (every xraylib model:
    ``predictions``), its input is returned and the logits are computed from its kernel and
    bias; otherwise the model's output (the probabilities) is used as it is.
    """
    import keras

    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if isinstance(last, keras.layers.Dense) and len(model.outputs) == 1 and activation in _SCORE_ACTIVATIONS:
        return last.input, last
    return model.outputs[0], None


# --------------------------------------------------------------------------------------------
# Grad-CAM


def _class_indices(class_index, n: int, n_classes: int) -> np.ndarray:
    """One class per image as ``(N,) int32``; -1 means "the predicted class"."""
    if class_index is None:
        return np.full(n, -1, dtype=np.int32)
    if isinstance(class_index, (int, np.integer)) and not isinstance(class_index, bool):
        indices = np.full(n, int(class_index), dtype=np.int64)
    else:
        indices = np.asarray(class_index)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ModelError(f"class_index must be None, an int or a sequence of ints (one per image), got {class_index!r}")
        if len(indices) != n:
            raise ModelError(f"class_index has {len(indices)} entries for {n} images; give one per image, or one int for all")
    bad = indices[(indices < 0) | (indices >= n_classes)]
    if len(bad):
        raise ModelError(f"class_index {int(bad[0])} is out of range: the model has {n_classes} classes (0..{n_classes - 1})")
    return indices.astype(np.int32)


def gradcam(
    model: "keras.Model",
    images_uint8: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    layer_name: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heatmaps ``(N, S, S) float32`` in [0, 1] for ``(N, S, S) uint8`` images.

    ``model``: takes ``(N, S, S, 1)`` float32 in 0..255 (every xraylib model; a loaded one is
    ``LoadedModel.model``). ``class_index``: the class to explain: an int for all images, one
    int per image, or None for each image's predicted class. ``layer_name``: the feature map
    (default :func:`find_last_conv_layer`). Images go through in batches of ``batch_size``,
    so memory does not grow with N (beyond the result).

    Each map is the ReLU of the feature-map channels weighted by the spatial mean of the class
    score's gradient (the pre-softmax logit where the model ends in a Dense layer), upsampled
    bilinearly to ``S x S`` and divided by its maximum: its peak is 1, and a map with no
    positive evidence for the class stays all zeros (never NaN). Values compare within one
    image, not across images. Works under mixed precision (computed in float32).
    """
    import tensorflow as tf

    layer = _conv_layer(model, layer_name)
    score_tensor, final_dense = _score_source(model)
    input_shape = tuple(model.inputs[0].shape[1:])
    # A memory-mapped cache stays on disk: only the batch being explained is read.
    images = images_uint8 if isinstance(images_uint8, np.ndarray) else np.asarray(images_uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or (len(input_shape) == 3 and tuple(images.shape[1:]) != tuple(input_shape[:2])):
        raise ModelError(
            f"images must be (N, S, S) uint8 as the model takes them ({input_shape[0]}x{input_shape[1]}), "
            f"got shape {images.shape}; for one image pass image[None], and preprocess files with the model's "
            "settings (xraylib.predict.preprocess_for_model)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    n, height, width = images.shape
    n_classes = int(score_tensor.shape[-1]) if final_dense is None else int(final_dense.units)
    classes = _class_indices(class_index, n, n_classes)
    out = np.zeros((n, height, width), dtype=np.float32)
    if n == 0:
        return out

    import keras

    grad_model = keras.Model(model.inputs, [layer.output, score_tensor])

    # One graph for all batches, traced once per call (the signature leaves the batch size free).
    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 1), tf.float32), tf.TensorSpec((None,), tf.int32)])
    def batch_maps(x, wanted):
        with tf.GradientTape() as tape:
            features, head_output = grad_model(x, training=False)
            # Watched explicitly: a frozen backbone has no trainable variable for the tape to follow.
            tape.watch(features)
            # float32 from here: under mixed precision the backbone runs in float16.
            scores = tf.cast(head_output, tf.float32)
            if final_dense is not None:
                # head_output is the final Dense layer's input: its kernel and bias without the softmax.
                scores = tf.matmul(scores, tf.cast(final_dense.kernel, tf.float32))
                if final_dense.use_bias:
                    scores = scores + tf.cast(final_dense.bias, tf.float32)
            chosen = tf.where(wanted >= 0, wanted, tf.argmax(scores, axis=-1, output_type=tf.int32))
            # Images are independent at inference, so the gradient of the sum gives each image its own.
            score = tf.reduce_sum(tf.gather(scores, chosen, batch_dims=1))
        grads = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, C): alpha_k^c of the paper
        cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, weights))
        cam = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        return tf.clip_by_value(tf.math.divide_no_nan(cam, peak), 0.0, 1.0)

    for begin in range(0, n, int(batch_size)):
        end = min(n, begin + int(batch_size))
        x = np.asarray(images[begin:end], dtype=np.float32)[..., None]
        out[begin:end] = batch_maps(tf.constant(x), tf.constant(classes[begin:end])).numpy()
    return out


# --------------------------------------------------------------------------------------------
# Showing and checking heatmaps (NumPy/OpenCV only)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """The heatmap in colour over the gray image: ``(S, S, 3) uint8`` RGB.

    ``image_uint8``: ``(H, W)`` uint8 (or ``(H, W, 3)`` RGB). ``heatmap``: 2-D in [0, 1]; resized
    bilinearly to the image if its size differs (e.g. onto the original-resolution file).
    ``alpha``: weight of the colour, 0 (image only) to 1 (heatmap only). ``colormap``: an
    OpenCV colour map (JET: blue = low, red = high).
    """
    image = np.asarray(image_uint8)
    heat = np.asarray(heatmap, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 3:
        rgb = image.astype(np.float32)
    elif image.ndim == 2:
        rgb = np.repeat(image.astype(np.float32)[..., None], 3, axis=-1)
    else:
        raise ConfigError(f"image_uint8 must be (H, W) gray or (H, W, 3) RGB, got shape {image.shape}")
    if heat.ndim != 2:
        raise ConfigError(f"heatmap must be 2-D (H, W), got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    if heat.shape != rgb.shape[:2]:
        heat = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255.0).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB).astype(np.float32)
    return np.clip(np.round((1.0 - alpha) * rgb + alpha * colour), 0, 255).astype(np.uint8)


def heat_share_inside(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Fraction of each heatmap's total heat that lies inside its mask: ``(N,) float64`` in [0, 1].

    ``heatmaps``: ``(N, H, W)`` (or one ``(H, W)``), non-negative. ``masks``: bool, the same shape,
    or one ``(H, W)`` mask for all (e.g. :func:`lung_field_mask`). An all-zero heatmap has no
    heat to share: NaN. Compare with the mask's share of the image area (``mask.mean()``), the
    share a heatmap spread evenly would get.
    """
    heat = np.asarray(heatmaps, dtype=np.float64)
    mask = np.asarray(masks).astype(bool)
    single = heat.ndim == 2
    if single:
        heat = heat[None]
    if heat.ndim != 3:
        raise ConfigError(f"heatmaps must be (N, H, W) or (H, W), got shape {np.shape(heatmaps)}")
    if mask.shape not in (heat.shape[1:], heat.shape) and not (single and mask.shape == (1, *heat.shape[1:])):
        raise ConfigError(f"masks must be (H, W) or (N, H, W) like the heatmaps {heat.shape}, got {mask.shape}; "
                          "resize them first (cv2.INTER_NEAREST)")
    if (heat < 0).any():
        raise ConfigError("heatmaps must be non-negative (Grad-CAM maps are in [0, 1])")
    total = heat.sum(axis=(1, 2))
    inside = (heat * mask).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
    return share
