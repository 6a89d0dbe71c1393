"""Where the networks run (``common.device``): parsing, early failure, and tensors that stay on the
model's device.

No GPU is needed: a missing or present GPU is simulated by patching ``torch.cuda``, and PyTorch's
``meta`` device (tensors without data) stands in for a GPU where device placement is checked. A meta
tensor refuses to meet a CPU tensor in one operation exactly as a CUDA tensor does, so a forgotten
``.to(device)`` fails these tests. A training loop on meta runs its forward passes, losses, backward
passes and optimiser steps, then stops where it first reads a number back (``float(loss)``: meta
tensors hold no values); that error, and no other, is what a correctly placed loop raises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crossmoda_lib import config, devices, inference, runs, segmentation, selftraining
from crossmoda_lib import singan as sg
from crossmoda_lib import translation as tr

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")
#: What a loop placed entirely on the meta device raises when it first reads a loss back.
READ_BACK = r"item\(\) cannot be called on meta tensors"


@pytest.fixture
def meta_device(monkeypatch):
    """``device="meta"`` accepted by the stages (the profile setting itself never allows it)."""
    use = devices.use
    monkeypatch.setattr(devices, "use", lambda spec="auto": META if str(spec) == "meta" else use(spec))


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_settings_resolve_to_devices(no_gpu):
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve(None) == torch.device("cpu")
    assert devices.resolve(" CPU ") == torch.device("cpu")
    assert devices.parse("cuda:3") == "cuda:3"
    for bad in ("gpu", "cuda:x", "cuda0", "", 1):
        with pytest.raises(devices.DeviceError, match="is not one of"):
            devices.resolve(bad)
    with pytest.raises(devices.DeviceError, match=r"'cuda' was asked for.*set common.device to 'cpu' or 'auto'"):
        devices.resolve("cuda")


def test_auto_takes_the_gpu_and_a_missing_index_is_named(one_gpu):
    assert devices.resolve("auto") == torch.device("cuda:0")
    assert devices.resolve("cuda") == torch.device("cuda:0")
    with pytest.raises(devices.DeviceError, match=r"has 1 GPU\(s\) \(cuda:0 \.\. cuda:0\)"):
        devices.resolve("cuda:1")


def _demo_with(tmp_path, key: str, value=None) -> Path:
    """``params/demo.yaml`` with ``common.<key>`` left out (``value`` None) or set to ``value``, as ``p.yaml``."""
    demo = config.merged_profile(ROOT / "params" / "demo.yaml")
    if value is None:
        del demo["common"][key]
    else:
        demo["common"][key] = value
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def test_profiles_default_to_auto_and_reject_unknown_devices(tmp_path):
    assert config.load_profile(ROOT / "params" / "paper.yaml")["common"]["device"] == "cuda"  # no silent CPU fallback
    assert config.load_profile(_demo_with(tmp_path, "device"))["common"]["device"] == "auto"
    with pytest.raises(config.ProfileError, match=r"p.yaml: common.device: device 'gpu0' is not one of"):
        config.load_profile(_demo_with(tmp_path, "device", "gpu0"))


def test_a_missing_gpu_stops_a_run_before_any_work(no_gpu, tmp_path):
    profile = config.merged_profile(ROOT / "params" / "smoke.yaml")
    profile["common"].update(device="cuda", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"))
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(devices.DeviceError, match="'cuda' was asked for"):
        runs.run_profile(path, progress=False)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # no cohort generated, nothing written


def test_every_stage_checks_its_device_before_reading_anything(no_gpu, tmp_path):
    missing = tmp_path / "nothing_here"
    calls = [
        lambda: tr.train_stage(missing, tmp_path / "02", tr.CycleGANConfig(), ["London"], device="cuda"),
        lambda: tr.translate_stage(missing, missing / "checkpoint.pt", tmp_path / "03", device="cuda"),
        lambda: sg.train_stage(missing, tmp_path / "04", sg.SinGANConfig(), "London", device="cuda"),
        lambda: sg.load_stage(missing, device="cuda"),
        lambda: segmentation.train_structures([], device="cuda"),
        lambda: selftraining.self_train(selftraining.SelfTrainingConfig(), missing, missing, missing, tmp_path / "07", device="cuda"),
        lambda: inference.predict_folder(missing, tmp_path / "08", missing, device="cuda"),
    ]
    for call in calls:
        with pytest.raises(devices.DeviceError):
            call()
    assert not any(tmp_path.iterdir())  # no output folder was made


def test_reuse_and_staleness_checks_ignore_the_device():
    """A stage trained on a GPU may be reused by a CPU run (and the other way round): the device
    changes rounding, as a thread count does, not the settings."""
    assert runs._differing_keys({"lr": 1.0, "device": "cuda"}, {"lr": 1.0, "device": "cpu"}) == []
    assert runs._differing_keys({"lr": 1.0, "device": "cuda"}, {"lr": 1.0}) == []  # runs made before the setting existed
    assert runs._differing_keys({"lr": 1.0}, {"lr": 2.0, "device": "cpu"}) == ["lr"]


def _tiny_singan(tmp_path: Path) -> tuple[sg.SinGANModel, torch.Tensor]:
    cfg = sg.SinGANConfig(scale_factor=0.75, min_size=12, max_size=24, ker_size=3, num_layer=3, nfc=4, max_nfc=8, niter=2)
    image = torch.rand(1, 1, 24, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model, _ = sg.train_singan(image, cfg, tmp_path / "singan", progress=False, device="cpu")
    return model, image


def test_singan_generation_stays_on_the_model_device(tmp_path):
    model, image = _tiny_singan(tmp_path)
    assert model.device == torch.device("cpu") and all(r.device.type == "cpu" for r in model.reals)
    on_meta = sg.SinGANModel(model.cfg, model.pyramid, [g.to(META) for g in model.generators], [z.to(META) for z in model.z_opt], model.noise_amps, [r.to(META) for r in model.reals], device=META)
    # The slice to harmonize comes from the CPU (stage 05 reads it from disk); noise is drawn on the CPU.
    for out in (sg.harmonize(on_meta, image, 1, seed=3), sg.sample(on_meta, 3, start_scale=1), sg.reconstruct(on_meta)):
        assert out.device == META and out.shape[-2:] == model.pyramid.sizes[-1]


def test_singan_checkpoints_load_onto_the_requested_device(tmp_path):
    model, image = _tiny_singan(tmp_path)
    again = sg.load_singan(tmp_path / "singan", image, model.cfg, device="cpu")
    assert torch.equal(sg.sample(again, 5), sg.sample(model, 5))  # the same pyramid, the same noise


def test_a_resumed_image_pool_returns_images_on_the_query_device():
    pool = tr.ImagePool(2, seed=0)
    for i in range(2):
        pool.query(torch.full((1, 1, 2, 2), float(i)))
    resumed = tr.ImagePool(2, seed=0)
    resumed.load_state_dict(pool.state_dict())  # as read from a checkpoint: CPU tensors
    outs = [resumed.query(torch.zeros(1, 1, 2, 2, device=META)) for _ in range(20)]
    assert all(o.device == META for o in outs)



def test_a_cyclegan_step_runs_on_the_networks_device(tmp_path):
    """Generators, discriminators, LSGAN / cycle / identity losses, both optimisers and the image
    pools: one whole iteration on the device, from CPU crops moved there as train_cyclegan moves them."""
    cfg = tr.CycleGANConfig(ngf=4, ndf=4, n_blocks=1, image_size=(32, 32), lambda_identity=0.5)
    nets = tr.CycleGAN.build(cfg).to(META)
    opt_g = torch.optim.Adam([*nets.G_A.parameters(), *nets.G_B.parameters()], lr=1e-3)
    opt_d = torch.optim.Adam([*nets.D_A.parameters(), *nets.D_B.parameters()], lr=1e-3)
    pool_a, pool_b = tr.ImagePool(2, 0), tr.ImagePool(2, 1)
    real_a, real_b = torch.zeros(1, 1, 32, 32).to(META), torch.zeros(1, 1, 32, 32).to(META)
    with pytest.raises(RuntimeError, match=READ_BACK):
        tr.train_step(nets, real_a, real_b, opt_g, opt_d, pool_a, pool_b, cfg)
    assert len(pool_a.images) == len(pool_b.images) == 1  # the discriminator half ran too


def test_segmentation_training_runs_on_its_device(meta_device, tmp_path):
    """Patches sampled and augmented on the CPU, then network, deep-supervised Dice + CE, gradient
    clipping and the optimiser step on the device."""
    cfg = segmentation.SegConfig(patch_size=(8, 16, 16), base_filters=4, max_filters=16, epochs=1, iterations_per_epoch=1, val_every=0)
    image = np.random.default_rng(0).random((12, 24, 24)).astype(np.float32)
    case = segmentation.Case("crossmoda2021_ldn_1", image, (image > 0.8).astype(np.uint8))
    with pytest.raises(RuntimeError, match=READ_BACK):
        segmentation.train([case], [], cfg, tmp_path / "model", progress=False, device="meta")


def test_singan_training_runs_on_its_device(meta_device, tmp_path):
    """Critic steps with the gradient penalty, generator steps with the reconstruction loss."""
    cfg = sg.SinGANConfig(scale_factor=0.75, min_size=12, max_size=24, ker_size=3, num_layer=3, nfc=4, max_nfc=8, niter=2)
    with pytest.raises(RuntimeError, match=READ_BACK):
        sg.train_singan(torch.rand(1, 1, 24, 20) * 2 - 1, cfg, tmp_path / "singan", progress=False, device="meta")


# --- common.cpu_kernels: the same kernels, so the same draw, on every x86-64 CPU with AVX2 --------


def _cpuinfo(tmp_path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_avx2_is_detected_from_the_cpu_flags_and_never_assumed(tmp_path):
    assert devices.cpu_has_avx2("x86_64", _cpuinfo(tmp_path, "avx avx2 fma avx512f"))
    assert not devices.cpu_has_avx2("x86_64", _cpuinfo(tmp_path, "avx fma"))  # 'avx' alone, or a longer name, is not avx2
    assert not devices.cpu_has_avx2("x86_64", _cpuinfo(tmp_path, "avx2x"))
    assert not devices.cpu_has_avx2("aarch64", _cpuinfo(tmp_path, "avx2"))
    assert not devices.cpu_has_avx2("x86_64", tmp_path / "absent")  # cannot tell: do not force kernels


def test_cpu_kernel_environment_per_choice():
    assert devices.cpu_kernel_environment("native") == ({}, "")
    assert devices.cpu_kernel_environment("avx2", has_avx2=True) == ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "")
    env, note = devices.cpu_kernel_environment("avx2", has_avx2=False)
    assert env == {} and "no AVX2" in note
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        devices.cpu_kernel_environment("avx512")


def test_pinned_kernels_reach_a_new_process_and_are_restored(monkeypatch):
    import os
    import subprocess
    import sys

    if not devices.cpu_has_avx2():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    probe = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
    with devices.pinned_cpu_kernels("avx2") as env:
        assert env["ATEN_CPU_CAPABILITY"] == "avx2"
        # torch itself, in a process started here, runs the AVX2 kernels
        assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ and os.environ["ONEDNN_MAX_CPU_ISA"] == "ALL"
    with devices.pinned_cpu_kernels("native") as env:
        assert env == {} and "ATEN_CPU_CAPABILITY" not in os.environ


def test_profiles_pin_the_cpu_kernels_and_reject_unknown_ones(tmp_path):
    assert config.load_profile(ROOT / "params" / "demo.yaml")["common"]["cpu_kernels"] == "avx2"
    assert config.load_profile(ROOT / "params" / "smoke.yaml")["common"]["cpu_kernels"] == "avx2"
    assert config.load_profile(ROOT / "params" / "ablations" / "no_tba.yaml")["common"]["cpu_kernels"] == "avx2"  # the demo's draw
    assert config.load_profile(_demo_with(tmp_path, "cpu_kernels"))["common"]["cpu_kernels"] == "native"
    with pytest.raises(config.ProfileError, match=r"p.yaml: common.cpu_kernels must be one of \('native', 'avx2'\), not 'AVX2'"):
        config.load_profile(_demo_with(tmp_path, "cpu_kernels", "AVX2"))
