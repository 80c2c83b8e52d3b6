"""xraylib.phantoms: the phantoms look like what they claim and repeat with the seed (speed: benchmarks/micro.py)."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

from xraylib.errors import ConfigError
from xraylib.phantoms import LABELS, RSNA_EXTRAS, Phantom, burn_marker, make_ct_slice, make_phantom


def _lungs(phantom: Phantom) -> list[np.ndarray]:
    """The lung fields as separate boolean masks, ordered left to right in the image."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(phantom.lung_mask.astype(np.uint8))
    order = sorted(range(1, count), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    big = [i for i in order if stats[i, cv2.CC_STAT_AREA] > 0.02 * phantom.lung_mask.size]
    return [labels == i for i in sorted(big, key=lambda i: stats[i, cv2.CC_STAT_LEFT])]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("kwargs", [{}, {"view": "AP"}, {"view": "AP Supine"}, {"view": "L"}, {"pediatric": True}])
def test_phantom_is_an_xray_like_uint8_image_with_masks(label: str, kwargs: dict) -> None:
    phantom = make_phantom(label, np.random.default_rng(3), 200, 180, **kwargs)
    assert phantom.image.shape == phantom.lung_mask.shape == phantom.lesion_mask.shape == (200, 180)
    assert phantom.image.dtype == np.uint8
    assert phantom.lung_mask.dtype == phantom.lesion_mask.dtype == bool
    assert phantom.image.std() > 25 and phantom.image.max() > 150
    assert 0.05 < phantom.lung_mask.mean() < 0.5
    # X-ray convention: lung air is darker than the body around it.
    body = phantom.image[~phantom.lung_mask & (phantom.image > 40)]
    assert phantom.image[phantom.lung_mask].mean() < body.mean() - 20
    with pytest.raises(ValueError):
        phantom.image[0, 0] = 1  # frozen result: arrays are read-only


def test_frontal_view_has_two_lungs_and_lateral_one() -> None:
    rng = np.random.default_rng(0)
    assert len(_lungs(make_phantom("normal", rng))) == 2
    assert len(_lungs(make_phantom("normal", rng, pediatric=True))) == 2
    assert len(_lungs(make_phantom("normal", rng, view="L"))) == 1


def test_the_patients_left_lung_field_is_smaller_because_of_the_heart() -> None:
    # The heart bulges to the image's right (the patient's left), narrowing that lung field.
    for seed in range(5):
        patient_right, patient_left = _lungs(make_phantom("normal", np.random.default_rng(seed)))
        assert patient_right.sum() > patient_left.sum()


@pytest.mark.parametrize("seed", range(6))
def test_lesion_masks_lie_inside_the_lungs(seed: int) -> None:
    for label in LABELS:
        for kwargs in ({}, {"view": "L"}, {"pediatric": True}):
            phantom = make_phantom(label, np.random.default_rng(seed), **kwargs)
            assert not (phantom.lesion_mask & ~phantom.lung_mask).any()
            if label == "normal":
                assert not phantom.lesion_mask.any()
            else:
                assert phantom.lesion_mask.sum() > 0.01 * phantom.lung_mask.sum()


@pytest.mark.parametrize("seed", range(6))
def test_covid_opacities_are_bilateral_lower_and_peripheral(seed: int) -> None:
    phantom = make_phantom("covid", np.random.default_rng(seed))
    lungs = _lungs(phantom)
    assert len(lungs) == 2
    for lung, lateral in zip(lungs, (-1, 1)):
        lesion = phantom.lesion_mask & lung
        assert lesion.sum() > 0.03 * lung.sum(), "each lung has ground-glass opacities"
        ys, xs = np.nonzero(lung)
        lesion_ys, lesion_xs = np.nonzero(lesion)
        assert lesion_ys.mean() > (ys.min() + ys.max()) / 2, "lower zone"
        assert lateral * (lesion_xs.mean() - xs.mean()) > 0, "towards the chest wall"


@pytest.mark.parametrize("seed", range(6))
def test_pneumonia_consolidation_is_unilateral(seed: int) -> None:
    phantom = make_phantom("pneumonia", np.random.default_rng(seed))
    involved = [(phantom.lesion_mask & lung).sum() > 0 for lung in _lungs(phantom)]
    assert sorted(involved) == [False, True]


@pytest.mark.parametrize("label, margin", [("covid", 15), ("pneumonia", 35)])
def test_lesion_is_brighter_than_the_same_place_in_the_same_patient_without_disease(label: str, margin: int) -> None:
    for seed in range(5):
        normal = make_phantom("normal", np.random.default_rng(seed))
        sick = make_phantom(label, np.random.default_rng(seed))
        lesion = sick.lesion_mask
        assert sick.image[lesion].mean() > normal.image[lesion].mean() + margin
        # Same seed, same anatomy and noise: far from the lesion the two images agree.
        near = cv2.dilate(lesion.astype(np.uint8), np.ones((31, 31), np.uint8)) > 0
        difference = np.abs(sick.image.astype(int) - normal.image.astype(int))
        assert difference[~near].mean() < 1.0
        np.testing.assert_array_equal(sick.lung_mask, normal.lung_mask)


def test_phantoms_vary_with_the_generator_and_repeat_with_the_seed() -> None:
    a = make_phantom("normal", np.random.default_rng(7))
    b = make_phantom("normal", np.random.default_rng(7))
    c = make_phantom("normal", np.random.default_rng(8))
    np.testing.assert_array_equal(a.image, b.image)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5
    rng = np.random.default_rng(7)
    first, second = make_phantom("normal", rng), make_phantom("normal", rng)
    assert not np.array_equal(first.image, second.image)


def test_pediatric_phantom_differs_from_adult() -> None:
    # A child: a relatively bigger heart (narrower left lung field relative to the right).
    ratios = {}
    for pediatric in (False, True):
        values = []
        for seed in range(6):
            right, left = _lungs(make_phantom("normal", np.random.default_rng(seed), pediatric=pediatric))
            values.append(left.sum() / right.sum())
        ratios[pediatric] = np.mean(values)
    assert ratios[True] < ratios[False]


def test_marker_is_a_bright_mark_in_the_top_left_corner_only() -> None:
    plain = make_phantom("covid", np.random.default_rng(2))
    marked = make_phantom("covid", np.random.default_rng(2), marker=True)
    changed = plain.image != marked.image
    h, w = plain.image.shape
    assert changed.any()
    assert not changed[h // 5 :, :].any() and not changed[:, w // 5 :].any()
    assert marked.image[: h // 5, : w // 5].max() == 255
    np.testing.assert_array_equal(plain.lesion_mask, marked.lesion_mask)
    colour = burn_marker(np.zeros((64, 64, 3), np.uint8))
    assert colour.shape == (64, 64, 3) and colour[:16, :16].max() == 255


def test_make_phantom_rejects_unknown_label_and_view() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="label"):
        make_phantom("tuberculosis", rng)
    with pytest.raises(ConfigError, match="view"):
        make_phantom("normal", rng, view="oblique")


@pytest.mark.parametrize("extra", RSNA_EXTRAS)
def test_an_extra_finding_changes_the_chest_but_adds_no_lesion(extra: str) -> None:
    plain = make_phantom("normal", np.random.default_rng(4))
    with_extra = make_phantom("normal", np.random.default_rng(4), extra=extra)
    assert not with_extra.lesion_mask.any()
    changed = np.abs(with_extra.image.astype(int) - plain.image.astype(int)) > 10
    assert changed.sum() > 100  # a nodule is the smallest: a few hundred pixels at 320x288
    with pytest.raises(ConfigError, match="extra"):
        make_phantom("normal", np.random.default_rng(4), extra="fracture")


def test_bilateral_pneumonia_involves_both_lungs() -> None:
    phantom = make_phantom("pneumonia", np.random.default_rng(0), bilateral=True)
    assert all((phantom.lesion_mask & lung).sum() > 0 for lung in _lungs(phantom))


def test_ct_slice_is_a_dark_lunged_disc_and_covid_adds_haze() -> None:
    clear = make_ct_slice(np.random.default_rng(5), 128, covid=False)
    hazy = make_ct_slice(np.random.default_rng(5), 128, covid=True)
    assert clear.shape == (128, 128) and clear.dtype == np.uint8
    assert clear[0, 0] < 20 and clear[64, 64] > clear[60, 35]  # air outside; mediastinum brighter than lung
    assert hazy.astype(int).sum() > clear.astype(int).sum()
