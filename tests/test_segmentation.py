"""Segmentation: nnU-Net planning, training and exact resume, largest component, inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from crossmoda_lib import segmentation as seg


def test_planning_strides_an_axis_only_within_twice_the_finest_spacing():
    fine = seg.plan_network((1.0, 0.4, 0.4), (64, 160, 160))
    assert fine.strides[0] == (1, 1, 1) and fine.strides[1] == (1, 2, 2)  # z not pooled at first
    assert fine.kernels[0] == (1, 3, 3)  # nor convolved along z
    assert fine.strides[2] == (2, 2, 2) and fine.kernels[1] == (3, 3, 3)  # z at 1.0 vs 0.8 mm: within 2x
    coarse = seg.plan_network((1.0, 0.6, 0.6), (64, 160, 160))
    assert coarse.strides[1] == (2, 2, 2) and coarse.kernels[0] == (3, 3, 3)
    assert coarse.kernels[-1] == (3, 3, 3) and len(coarse.kernels) == len(coarse.strides)
    # Feature maps never go below min_feature_map (4) and pooling per axis is capped at 5.
    for plan, patch in ((fine, (64, 160, 160)), (coarse, (64, 160, 160))):
        size = np.array(patch)
        for stride in plan.strides:
            size = np.ceil(size / np.array(stride))
        assert size.min() >= 4 and max(plan.pools_per_axis) <= 5
    # Patch sizes are padded to what the poolings divide.
    odd = seg.plan_network((1.0, 0.6, 0.6), (20, 50, 50))
    assert all(p % 2**k == 0 for p, k in zip(odd.patch_size, odd.pools_per_axis))


def test_network_from_the_plan():
    cfg = seg.SegConfig(patch_size=(16, 32, 32), base_filters=8, max_filters=32)
    net = seg.build_network(cfg)
    net.train()
    out = net(torch.zeros(2, 1, 16, 32, 32))
    assert out.shape[0] == 2 and out.shape[2:] == (2, 16, 32, 32) and out.shape[1] >= 2
    net.eval()
    assert net(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 2, 16, 32, 32)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert seg.deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert seg.poly_lr(0, cfg) == cfg.lr and seg.poly_lr(250, cfg) == pytest.approx(0.01 * 0.5**0.9)


def _toy_cases(n: int = 2) -> list[seg.Case]:
    rng = np.random.default_rng(0)
    cases = []
    for k in range(n):
        image = (0.3 + 0.05 * rng.standard_normal((16, 32, 32))).astype(np.float32)
        target = np.zeros(image.shape, dtype=np.uint8)
        z, y, x = np.mgrid[:16, :32, :32]
        target[((z - 8) / 4.0) ** 2 + ((y - 12 - 4 * k) / 5.0) ** 2 + ((x - 16) / 5.0) ** 2 < 1] = 1
        image[target > 0] += 0.5
        cases.append(seg.Case(f"case{k}", image, target))
    return cases


TOY = seg.SegConfig(patch_size=(16, 32, 32), base_filters=4, max_filters=16, batch_size=2, epochs=6, iterations_per_epoch=4, val_every=3, mirror_tta=False, lr=0.01)


def test_short_training_lowers_the_loss_and_resume_is_exact(tmp_path):
    cases = _toy_cases()
    net, history = seg.train(cases, cases[:1], TOY, tmp_path / "straight", progress=False)
    assert len(history) == 6 and history.loss.iloc[-1] < history.loss.iloc[0]
    assert history.lr.iloc[0] == 0.01 and history.lr.iloc[-1] < 0.01
    assert "val_dice" in history.columns and history.val_dice.notna().sum() == 2
    seg.train(cases, cases[:1], TOY, tmp_path / "resumed", stop_after_epoch=2, progress=False)
    resumed, history2 = seg.train(cases, cases[:1], TOY, tmp_path / "resumed", progress=False)
    for key, value in net.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert history.loss.tolist() == history2.loss.tolist()
    loaded, cfg = seg.load_model(tmp_path / "straight")
    assert cfg == TOY
    with pytest.raises(ValueError, match="other settings"):
        seg.train(cases, [], seg.SegConfig(**{**TOY.__dict__, "epochs": 7}), tmp_path / "straight", progress=False)
    # A checkpoint from before a setting existed is reused when this run keeps its default ...
    ckpt = tmp_path / "straight" / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=False)
    del saved["key"]["config"]["fg_jitter"]
    torch.save(saved, ckpt)
    again, _ = seg.train(cases, cases[:1], TOY, tmp_path / "straight", progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    # ... and refused when it does not.
    with pytest.raises(ValueError, match="other settings"):
        seg.train(cases, cases[:1], seg.SegConfig(**{**TOY.__dict__, "fg_jitter": 0.5}), tmp_path / "straight", progress=False)


def test_patches_oversample_foreground():
    cases = _toy_cases(1)
    sampler = seg.PatchSampler(cases, (8, 8, 8), fg_fraction=0.33, seed=0)
    hits = [tg[-1].any() for tg in (sampler.batch(3)[1] for _ in range(50))]
    assert all(hits)  # the last third of each batch is centred on foreground


def _single_voxel_case() -> seg.Case:
    target = np.zeros((40, 40, 40), dtype=np.uint8)
    target[20, 17, 23] = 1
    return seg.Case("dot", np.zeros(target.shape, dtype=np.float32), target)


def test_fg_jitter_moves_the_foreground_voxel_within_the_patch():
    patch = (8, 12, 16)
    centred = seg.PatchSampler([_single_voxel_case()], patch, fg_fraction=1.0, seed=0)
    spread = seg.PatchSampler([_single_voxel_case()], patch, fg_fraction=1.0, seed=0, fg_jitter=1.0)
    half = seg.PatchSampler([_single_voxel_case()], patch, fg_fraction=1.0, seed=0, fg_jitter=0.5)
    where = {}
    for name, sampler in (("centred", centred), ("spread", spread), ("half", half)):
        spots = []
        for _ in range(300):
            target = sampler.batch(1)[1][0, 0]
            assert target.sum() == 1, name  # the voxel is always inside the patch
            spots.append(np.argwhere(target)[0])
        where[name] = np.array(spots)
    # nnU-Net: the voxel at the patch centre (index size // 2), every time.
    assert (where["centred"] == np.array(patch) // 2).all()
    # Jitter 1: every position from 1 to size - 1 along each axis; 0.5: within half of that reach.
    for axis, size in enumerate(patch):
        assert where["spread"][:, axis].min() == 1 and where["spread"][:, axis].max() == size - 1
        reach = int(0.5 * (size // 2 - 1))
        assert np.abs(where["half"][:, axis] - size // 2).max() == reach
    with pytest.raises(ValueError, match="fg_jitter"):
        seg.PatchSampler([_single_voxel_case()], patch, fg_fraction=1.0, seed=0, fg_jitter=1.5)


def test_largest_component_keeps_exactly_the_largest():
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[2:6, 2:6, 2:6] = 1  # 64 voxels
    mask[10:17, 10:17, 10:17] = 1  # 343 voxels
    mask[0, 19, 19] = 1
    mask[17, 16, 16] = 0
    kept = seg.largest_component(mask)
    comps, _ = ndimage.label(mask)
    assert np.array_equal(kept, (comps == comps[12, 12, 12]).astype(np.uint8))
    assert seg.largest_component(np.zeros((3, 3, 3))).sum() == 0


def test_largest_components_keeps_the_n_largest_and_only_the_cochlea_option_uses_it():
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[5:8, 5:8, 5:8] = 1  # 27
    mask[10:14, 10:14, 10:14] = 1  # 64
    mask[16:18, 16:18, 16:19] = 1  # 12
    comps, _ = ndimage.label(mask)
    two = (comps == comps[12, 12, 12]) | (comps == comps[6, 6, 6])
    assert np.array_equal(seg.largest_components(mask, 2).astype(bool), two)
    assert np.array_equal(seg.largest_components(mask, 4), mask)
    assert np.array_equal(seg.largest_components(mask, 1), seg.largest_component(mask))
    with pytest.raises(ValueError, match="at least 1"):
        seg.largest_components(mask, 0)
    p = mask.astype(np.float32) * 0.9
    none = np.zeros_like(p)
    assert np.array_equal(seg.compose_label(none, p) == 2, mask.astype(bool))  # the paper: every cochlea component
    assert np.array_equal(seg.compose_label(none, p, cochlea_components=2) == 2, two)
    assert np.array_equal(seg.compose_label(p, none, keep_largest_vs=False, cochlea_components=1) == 1, mask.astype(bool))


def test_sliding_window_prediction_shape_and_values(tmp_path):
    cases = _toy_cases(1)
    cfg = seg.SegConfig(**{**TOY.__dict__, "mirror_tta": True})
    net = seg.build_network(cfg).eval()
    image = np.random.default_rng(1).random((20, 40, 36)).astype(np.float32)
    prob = seg.predict_probabilities(net, image, cfg)
    assert prob.shape == image.shape and 0 <= prob.min() and prob.max() <= 1
    assert set(np.unique(seg.predict_mask(net, cases[0].image, cfg))) <= {0, 1}
    assert seg.kfold(["a", "b", "c", "d", "e"], 5, 0)[0][1] and len(seg.kfold(["a"], 1, 0)[0][1]) == 0


def test_optimizer_choice():
    net = torch.nn.Linear(2, 2)
    sgd = seg.make_optimizer(net, TOY)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    adam = seg.make_optimizer(net, seg.SegConfig(**{**TOY.__dict__, "optimizer": "adam", "lr": 1e-3}))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3 and adam.defaults["weight_decay"] == 3e-5
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        seg.make_optimizer(net, seg.SegConfig(**{**TOY.__dict__, "optimizer": "rmsprop"}))


def _toy_pairs(folder) -> list[seg.Pair]:
    """The toy cases as NIfTI files (label 1 = VS, 2 = cochlea: the same blob, so both structures train)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k, case in enumerate(_toy_cases()):
        name = f"crossmoda2022_etz_{k + 1:03d}"
        image, label = folder / f"{name}_T2.nii.gz", folder / f"{name}_Label.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(case.image), str(image))
        sitk.WriteImage(sitk.GetImageFromArray((case.target * (1 if k == 0 else 2)).astype(np.uint8)), str(label))
        pairs.append(seg.Pair(name, image, label))
    return pairs


def _weights(folder) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)["net"]


def test_models_trained_side_by_side_equal_models_trained_in_turn(tmp_path):
    pairs = _toy_pairs(tmp_path / "data")
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 2, "val_every": 0})
    jobs = lambda root: [seg.StructureJob(pairs, s, cfg, 1, root / s) for s in ("vs", "cochlea")]  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two processes below gets on a 2-thread machine
    try:
        in_turn = seg.train_structures(jobs(tmp_path / "in_turn"), workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    if threads // 2 != 1:
        pytest.skip(f"{threads} threads: the two worker processes would not run with one thread each")
    side_by_side = seg.train_structures(jobs(tmp_path / "side_by_side"), workers=2, progress=False)
    for structure, a, b in zip(("vs", "cochlea"), in_turn, side_by_side):
        assert a.equals(b), structure
        wa, wb = _weights(tmp_path / "in_turn" / structure / "fold_0"), _weights(tmp_path / "side_by_side" / structure / "fold_0")
        assert all(torch.equal(wa[key], wb[key]) for key in wa), structure
    # The two structures learned different targets: their models differ.
    wv, wc = _weights(tmp_path / "in_turn" / "vs" / "fold_0"), _weights(tmp_path / "in_turn" / "cochlea" / "fold_0")
    assert not all(torch.equal(wv[key], wc[key]) for key in wv)
    manifest = (tmp_path / "side_by_side" / "cochlea" / "manifest.json").read_text()
    assert '"structure": "cochlea"' in manifest and "crossmoda2022_etz_002" in manifest


def test_a_failing_worker_names_its_model_and_stops_the_run(tmp_path):
    pairs = _toy_pairs(tmp_path / "data")
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 2, "val_every": 0})
    other = seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0})
    seg.train_structure(pairs, "cochlea", other, 1, tmp_path / "cochlea", progress=False)
    (tmp_path / "cochlea" / "fold_0" / "history.csv").unlink()  # so that it counts as unfinished
    jobs = [seg.StructureJob(pairs, "vs", cfg, 1, tmp_path / "vs"), seg.StructureJob(pairs, "cochlea", cfg, 1, tmp_path / "cochlea")]
    with pytest.raises(ValueError, match=r"cochlea/fold_0/checkpoint.pt: checkpoint was made with other settings"):
        seg.train_structures(jobs, workers=2, progress=False)
    assert not (tmp_path / "vs" / "manifest.json").exists()


def test_warm_start_begins_from_the_teacher_and_is_recorded(tmp_path):
    """A warm-started model's first loss is the teacher's level, not a fresh network's; zero
    epochs of training leave exactly the teacher's weights; resuming with another start is refused;
    a network of other shapes is refused, naming the teacher's folder."""
    cases = _toy_cases()
    teacher, _ = seg.train(cases, [], TOY, tmp_path / "teacher", progress=False)
    # epochs=0: the student is its start, bit for bit.
    zero = seg.SegConfig(**{**TOY.__dict__, "epochs": 0})
    copy, _ = seg.train(cases, [], zero, tmp_path / "copy", progress=False, init_from=tmp_path / "teacher")
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in teacher.state_dict().items())
    short = seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0})
    _, fresh = seg.train(cases, [], short, tmp_path / "fresh", progress=False)
    _, warm = seg.train(cases, [], short, tmp_path / "warm", progress=False, init_from=tmp_path / "teacher")
    assert warm.loss.iloc[0] < fresh.loss.iloc[0]
    with pytest.raises(ValueError, match="other settings"):  # the start is part of the checkpoint's key
        seg.train(cases, [], short, tmp_path / "warm", progress=False)
    wider = seg.SegConfig(**{**TOY.__dict__, "base_filters": 8})
    with pytest.raises(ValueError, match="teacher: cannot warm-start"):
        seg.train(cases, [], wider, tmp_path / "wide", progress=False, init_from=tmp_path / "teacher")
    finer = seg.SegConfig(**{**TOY.__dict__, "spacing": (1.0, 0.4, 0.4)})  # z keeps kernel 1 at the first level
    with pytest.raises(ValueError, match="cannot warm-start"):
        seg.check_warm_start(TOY, finer, tmp_path / "teacher")
    seg.check_warm_start(TOY, short, tmp_path / "teacher")  # epochs do not change the network


def test_warm_started_ensembles_take_the_teachers_fold(tmp_path):
    pairs = _toy_pairs(tmp_path / "data")
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0, "lr": 0.0})  # SGD at lr 0 leaves the start as it is
    seg.train_structure(pairs, "vs", seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0}), 1, tmp_path / "teacher", progress=False)
    assert seg.warm_start_fold(tmp_path / "teacher", 0) == tmp_path / "teacher" / "fold_0"
    assert seg.warm_start_fold(tmp_path / "teacher", 3) == tmp_path / "teacher" / "fold_0"  # one model starts every fold
    seg.train_structures([seg.StructureJob(pairs, "vs", cfg, 2, tmp_path / "student", None, tmp_path / "teacher")], progress=False)
    teacher = _weights(tmp_path / "teacher" / "fold_0")
    for k in (0, 1):
        student = _weights(tmp_path / "student" / f"fold_{k}")
        assert all(torch.equal(teacher[key], student[key]) for key in teacher)
    assert '"init_from": "' in (tmp_path / "student" / "manifest.json").read_text()
    with pytest.raises(Exception, match="manifest.json missing"):
        seg.warm_start_fold(tmp_path / "nowhere", 0)


def test_volumes_read_from_disk_train_the_same_model_as_volumes_in_memory(tmp_path):
    """crossmoda_lib.volumes: the store unpacks each volume once (image clipped as the model sees
    it, target, foreground indices) and hands out memory maps; the model is bit-identical to one
    trained on the same volumes held in memory, and a changed input is unpacked again."""
    from crossmoda_lib.volumes import VolumeStore

    pairs = [p._replace(real=True) for p in _toy_pairs(tmp_path / "data")]  # real: the clip applies
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 2, "val_every": 1})
    in_memory = [seg.load_case(p.image, p.label, 1, 95.0) for p in pairs]
    store = VolumeStore(pairs, 1, 95.0, tmp_path / "cache")
    assert len(store) == 2 and store.names == [c.name for c in in_memory]
    case = store[0]
    assert isinstance(case.image, np.memmap) and isinstance(case.target, np.memmap)
    assert np.array_equal(case.image, in_memory[0].image) and np.array_equal(case.target, in_memory[0].target)
    assert np.array_equal(case.foreground, in_memory[0].foreground)
    # The store keeps file names, not volumes.
    assert all(isinstance(v, str) for e in store.entries for k, v in e.items())
    a, ha = seg.train(in_memory, in_memory[:1], cfg, tmp_path / "memory", progress=False)
    b, hb = seg.train(store, store[:1], cfg, tmp_path / "disk", progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert ha.equals(hb)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 6
    before = {f.name: f.stat().st_mtime_ns for f in files}
    VolumeStore(pairs, 1, 95.0, tmp_path / "cache")  # reused
    assert {f.name: f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").glob("*.npy"))} == before
    VolumeStore(pairs, 1, None, tmp_path / "cache")  # another clip: unpacked anew beside
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 12


def test_a_finished_stage_leaves_no_unpacked_volumes(tmp_path):
    pairs = _toy_pairs(tmp_path / "data")
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0})
    seg.train_structures([seg.StructureJob(pairs, "vs", cfg, 1, tmp_path / "stage" / "vs")], progress=False)
    assert (tmp_path / "stage" / "vs" / "fold_0" / "checkpoint.pt").is_file()
    assert not (tmp_path / "stage" / "volume_cache").exists()


def test_models_spread_over_two_devices_equal_models_trained_in_turn(tmp_path):
    """The multi-GPU path (one process per device, each model on its process's device), with two
    CPU "devices": the models are those trained one after the other, and each row says where."""
    pairs = _toy_pairs(tmp_path / "data")
    cfg = seg.SegConfig(**{**TOY.__dict__, "epochs": 1, "val_every": 0})
    jobs = lambda root: [seg.StructureJob(pairs, s, cfg, 1, root / s) for s in ("vs", "cochlea")]  # noqa: E731
    threads = torch.get_num_threads()
    if threads // 2 != 1:
        pytest.skip(f"{threads} threads: the two worker processes would not run with one thread each")
    torch.set_num_threads(1)
    try:
        in_turn = seg.train_structures(jobs(tmp_path / "in_turn"), workers=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    spread = seg.train_structures(jobs(tmp_path / "spread"), workers=1, progress=False, device=["cpu", "cpu"])
    for structure, a, b in zip(("vs", "cochlea"), in_turn, spread):
        assert list(b.device) == ["cpu"] and a.equals(b), structure
        wa, wb = _weights(tmp_path / "in_turn" / structure / "fold_0"), _weights(tmp_path / "spread" / structure / "fold_0")
        assert all(torch.equal(wa[key], wb[key]) for key in wa), structure


def test_devices_to_spread_over():
    from crossmoda_lib import devices

    assert devices.spread("cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert devices.spread("auto") == [torch.device("cpu")]
    else:
        assert devices.spread("auto") == [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
        assert devices.spread("cuda:0") == [torch.device("cuda:0")]
