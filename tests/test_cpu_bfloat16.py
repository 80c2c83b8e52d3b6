"""bfloat16 on CPUs with bfloat16 units (AMX, AVX512-BF16): which precision "auto" chooses from a CPU's
``/proc/cpuinfo`` flags per backbone, the feature cache kept apart per precision (the float32 key unchanged), and a
model trained in bfloat16 that computes its features close to float32 and is saved in float32.

The choice is tested on flag lines of real CPUs, so it runs anywhere; what computes in bfloat16 runs on any CPU
(emulated where there are no bfloat16 units: slow but correct), and the closeness check only on a CPU that has them.
VGG16 with random weights at 32 px on the 24 synthetic phantoms of tests/test_features.py.
"""
from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest

from test_features import CLASSES, PLAIN, VGG, as_input, make_data
from xraylib import explain, features, models
from xraylib.errors import ConfigError, ModelError
from xraylib.preprocess import PIXELS_VERSION, PreprocessSettings
from xraylib.runs import train
from xraylib.train import TrainSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# /proc/cpuinfo lines of real CPUs.
SAPPHIRE_RAPIDS = (  # the 2-core Xeon (a cloud VM) that CI and development run on: AMX and AVX512-BF16
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq "
    "ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor "
    "lahf_lm abm 3dnowprefetch cpuid_fault fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f "
    "avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 "
    "xsaves avx_vnni avx512_bf16 arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq rdpid cldemote movdiri movdir64b fsrm serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 "
    "arch_capabilities")
CASCADE_LAKE = (  # AVX-512 and VNNI (int8), but no bfloat16: a VMware guest
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon nopl xtopology tsc_reliable nonstop_tsc cpuid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave "
    "avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 "
    "avx2 smep bmi2 invpcid avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt "
    "xsavec xgetbv1 xsaves arat pku ospke avx512_vnni md_clear flush_l1d arch_capabilities")
COLAB_BROADWELL = (  # "Intel(R) Xeon(R) CPU @ 2.20GHz", a common Colab CPU: AVX2, no AVX-512
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq "
    "ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch invpcid_single ssbd ibrs ibpb stibp fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm "
    "rdseed adx smap xsaveopt arat md_clear arch_capabilities")
ZEN4 = (  # AMD EPYC 9004 (Genoa): AVX512-BF16, no AMX
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf "
    "rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
    "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext "
    "perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 invpcid_single hw_pstate ssbd mba ibrs ibpb "
    "stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc "
    "cqm_mbm_total cqm_mbm_local avx512_bf16 clzero irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc arat npt lbrv "
    "svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload "
    "vgif v_spec_ctrl avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq rdpid overflow_recov succor smca fsrm flush_l1d")
GRAVITON2 = (  # ARM (Neoverse N1): "Features", no bfloat16 here
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs")


def cpuinfo(flags_line: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: a CPU\n{flags_line}\nbogomips\t: 4000.00\n\n"


@pytest.mark.parametrize("flags_line, has_units", [
    (SAPPHIRE_RAPIDS, True), (ZEN4, True), (CASCADE_LAKE, False), (COLAB_BROADWELL, False), (GRAVITON2, False), ("", False),
])
def test_auto_is_bfloat16_only_for_vgg16_and_only_on_a_cpu_with_bfloat16_units(flags_line, has_units):
    flags = models.cpu_flags(cpuinfo(flags_line))
    assert models.cpu_has_fast_bfloat16(flags) is has_units
    for backbone, faster in [("vgg16", True), ("mobilenet", False), ("mobilenet_v2", False), ("resnet50", False),
                             ("densenet121", False), ("small_cnn", False)]:
        expected = "mixed_bfloat16" if has_units and faster else "float32"
        assert models.choose_dtype_policy("auto", [], backbone=backbone, cpu_bfloat16=has_units) == expected, backbone
    # Fine-tuning trains the backbone: "auto" keeps it float32; the settings that force a precision do as they say.
    assert models.choose_dtype_policy("auto", [], backbone="vgg16", frozen=False, cpu_bfloat16=has_units) == "float32"
    assert models.choose_dtype_policy("bfloat16", [], backbone="mobilenet", cpu_bfloat16=has_units) == "mixed_bfloat16"
    assert models.choose_dtype_policy("off", [], backbone="vgg16", cpu_bfloat16=has_units) == "float32"
    # A GPU decides as before, whatever the CPU: float16 from compute capability 7.0, else float32.
    assert models.choose_dtype_policy("auto", [(7, 5)], backbone="vgg16", cpu_bfloat16=has_units) == "mixed_float16"
    assert models.choose_dtype_policy("auto", [(6, 0)], backbone="vgg16", cpu_bfloat16=has_units) == "float32"


def test_this_cpus_flags_and_the_override(monkeypatch):
    here = models.cpu_flags()
    assert isinstance(here, frozenset)
    monkeypatch.setenv(models.CPU_BFLOAT16_ENV, "1")
    assert models.cpu_has_fast_bfloat16()
    assert models.choose_dtype_policy("auto", [], backbone="vgg16") == "mixed_bfloat16"
    monkeypatch.setenv(models.CPU_BFLOAT16_ENV, "0")
    assert not models.cpu_has_fast_bfloat16()
    monkeypatch.delenv(models.CPU_BFLOAT16_ENV)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # TensorFlow without oneDNN emulates bfloat16
    assert not models.cpu_has_fast_bfloat16()
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert models.cpu_has_fast_bfloat16() == any(flag in here for flag in models.BFLOAT16_CPU_FLAGS)


def test_the_precision_setting_takes_bfloat16_and_refuses_nonsense():
    assert TrainSettings(mixed_precision="bfloat16").mixed_precision == "bfloat16"
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainSettings(mixed_precision="bf16")
    with pytest.raises(ModelError, match="mixed_precision"):
        models.choose_dtype_policy("bf16")


# --------------------------------------------------------------------------------------------
# The model, its feature cache, and the saved model

#: features.json of a float32 VGG16 cache as xraylib wrote it before bfloat16 (at commit 65553c4), with its key.
FLOAT32_DESCRIPTION_BEFORE = {
    "format": "xraylib bottleneck features v1", "backbone": "vgg16", "alpha": None, "image_size": 32, "pooling": "avg",
    "feature_layer": "block5_pool", "backbone_weights_sha1": "0" * 40,
    "preprocessing": {"image_size": 32, "resize": "stretch", "stored_as": "uint8 grayscale (N, S, S)"},
    "pixels_version": 3, "compute_dtype": "float32", "stored_dtype": "float32", "weights": None,
}


def bfloat16_copy(model: keras.Model, spec: models.ModelSpec) -> keras.Model:
    copy = models.build_model(spec, dtype_policy="mixed_bfloat16")
    copy.set_weights(model.get_weights())
    return copy


def test_bfloat16_computes_the_backbone_only_and_keeps_its_own_feature_cache():
    keras.utils.set_random_seed(0)
    plain = models.build_model(VGG, dtype_policy="float32")
    bf16 = bfloat16_copy(plain, VGG)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after the build
    assert bf16.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert bf16.get_layer("block1_conv1").variable_dtype == "float32"  # weights stay float32
    for name in models.head_layer_names():
        assert bf16.get_layer(name).dtype_policy.name == "float32", name  # pooling and the trained head
    assert (models.model_dtype_policy(plain), models.model_dtype_policy(bf16)) == ("float32", "mixed_bfloat16")

    settings = PreprocessSettings(image_size=32)
    described = {name: features.describe(model, VGG, settings) for name, model in (("f32", plain), ("bf16", bf16))}
    assert described["bf16"]["compute_dtype"] == "mixed_bfloat16"
    assert {k: v for k, v in described["bf16"].items() if k != "compute_dtype"} == \
           {k: v for k, v in described["f32"].items() if k != "compute_dtype"}
    assert features.cache_key(described["f32"]) != features.cache_key(described["bf16"])
    # A float32 cache keeps the key it had before bfloat16 existed: no cache on anyone's Drive is computed again.
    assert described["f32"] == {**FLOAT32_DESCRIPTION_BEFORE, "pixels_version": PIXELS_VERSION,
                                "backbone_weights_sha1": described["f32"]["backbone_weights_sha1"]}
    assert features.cache_key(FLOAT32_DESCRIPTION_BEFORE) == "b1c44488fe4a7cbc"


def test_bfloat16_features_are_close_to_float32_on_this_cpu(tmp_path):
    if not models.cpu_has_fast_bfloat16(models.cpu_flags()):
        pytest.skip(f"this CPU has none of {models.BFLOAT16_CPU_FLAGS} in /proc/cpuinfo: bfloat16 would be emulated")
    data = make_data(tmp_path)
    keras.utils.set_random_seed(0)
    plain = models.build_model(VGG, dtype_policy="float32")
    bf16 = bfloat16_copy(plain, VGG)
    images = as_input(np.concatenate([data[s].images for s in ("train", "val", "test")]))
    expected = features.feature_extractor(plain).predict(images, verbose=0)
    got = features.feature_extractor(bf16).predict(images, verbose=0)
    assert got.dtype == np.float32 and got.shape == expected.shape
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.02
    np.testing.assert_allclose(bf16.predict(images, verbose=0), plain.predict(images, verbose=0), atol=0.005)


def test_a_run_trained_in_bfloat16_is_saved_in_float32_and_its_features_cached_apart(tmp_path):
    data = make_data(tmp_path / "data")
    settings = dataclasses.replace(PLAIN, epochs=1, mixed_precision="bfloat16")
    result = train(data, VGG, settings, tmp_path / "run", verbose=0)
    assert result.execution["dtype_policy"] == "mixed_bfloat16"
    folder = features.cache_folder(data, result.execution["feature_cache"]["key"])
    assert json.loads((folder / "features.json").read_text())["compute_dtype"] == "mixed_bfloat16"

    # The saved model computes in float32, so it predicts on a CPU without bfloat16 units as fast as any float32 model.
    images = as_input(data["test"].images)
    for saved in (keras.models.load_model(tmp_path / "run" / "model.keras", compile=False),
                  models.load_model(tmp_path / "run").model):
        assert all(layer.dtype_policy.name == "float32" for layer in saved.layers)
        np.testing.assert_allclose(saved.predict(images, verbose=0), result.model.predict(images, verbose=0), atol=0.02)
    # Grad-CAM works on the bfloat16 model in memory (computed in float32 from the last conv layer on).
    heat = explain.gradcam(result.model, data["test"].images[:2])
    assert heat.dtype == np.float32 and np.isfinite(heat).all()
    np.testing.assert_allclose(heat, explain.gradcam(saved, data["test"].images[:2]), atol=0.05)

    # Continued for one more epoch, the run rebuilds its backbone in bfloat16 from the checkpoint and reuses its cache.
    more = train(data, VGG, dataclasses.replace(settings, epochs=2), tmp_path / "run", verbose=0)
    assert more.execution["dtype_policy"] == "mixed_bfloat16" and more.resumed_from_epoch == 1
    assert more.execution["feature_cache"]["key"] == result.execution["feature_cache"]["key"]
    assert sum(more.execution["feature_cache"]["computed_rows"].values()) == 0

    # A float32 run on the same data gets a cache of its own: float32 and bfloat16 features never mix.
    train(data, VGG, dataclasses.replace(settings, mixed_precision="off"), tmp_path / "run32", verbose=0)
    caches = sorted(json.loads(p.read_text())["compute_dtype"] for p in folder.parent.glob("*/features.json"))
    assert caches == ["float32", "mixed_bfloat16"]
    assert CLASSES == tuple(data.classes)
