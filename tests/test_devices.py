"""Where the networks run (``common.device``): parsing, early failure, and tensors that stay on the
model's device.

No GPU is needed: a missing or present GPU is simulated by patching ``torch.cuda``, and PyTorch's
``meta`` device (tensors without data) stands in for a GPU where device placement is checked. A meta
tensor refuses to meet a CPU tensor in one operation exactly as a CUDA tensor does, so a forgotten
``.to(device)`` fails these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from crossmoda_lib import config, devices, inference, runs, segmentation, selftraining
from crossmoda_lib import singan as sg
from crossmoda_lib import translation as tr

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")


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


def test_profiles_default_to_auto_and_reject_unknown_devices(tmp_path):
    demo = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    assert config.load_profile(ROOT / "params" / "paper.yaml")["common"]["device"] == "cuda"  # no silent CPU fallback
    del demo["common"]["device"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(demo))
    assert config.load_profile(path)["common"]["device"] == "auto"
    demo["common"]["device"] = "gpu0"
    path.write_text(yaml.safe_dump(demo))
    with pytest.raises(config.ProfileError, match=r"p.yaml: common.device: device 'gpu0' is not one of"):
        config.load_profile(path)


def test_a_missing_gpu_stops_a_run_before_any_work(no_gpu, tmp_path):
    profile = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
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

