import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tl_dist.data import augment, device_cache, listing, loaders, samplers
from tl_dist import config
from tl_dist.models import backbones
from tl_dist.errors import UserError

from .conftest import make_images



def _data_cfg(over):
    """The data section as a run sees it: preprocessing filled in from the model's weights."""
    return backbones.resolve(config.load(None, over)).data

def test_class_mismatch_lists_difference(tmp_path):
    make_images(tmp_path, {"train": {"ants": 2, "bees": 2, "wasps": 1}, "val": {"ants": 1, "bees": 1, "moths": 1}})
    with pytest.raises(UserError, match=r"only in train: \['wasps'\]; only in val: \['moths'\]"):
        listing.list_splits(str(tmp_path))


def test_missing_split_and_empty_split(tmp_path):
    make_images(tmp_path, {"train": {"ants": 2, "bees": 2}})
    with pytest.raises(UserError, match="split folder not found: .*val"):
        listing.list_splits(str(tmp_path))
    (tmp_path / "val" / "ants").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        listing.list_splits(str(tmp_path))
    with pytest.raises(UserError, match="data.root not found"):
        listing.list_splits(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("n, bs, world", [(22, 4, 2), (13, 2, 3), (5, 4, 2), (8, 4, 2), (1, 1, 4)])
def test_global_batches_do_not_depend_on_world_size(n, bs, world):
    single = samplers.TrainBatchSampler(n, bs * world, 1, 0, seed=3)
    ranks = [samplers.TrainBatchSampler(n, bs, world, r, seed=3) for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    assert all(len(p) == len(single) for p in per_rank)  # same step count on every rank
    for step, batch in enumerate(single):
        real = [k[0] for p in per_rank for k in p[step] if k[2] > 0]
        assert real == [k[0] for k in batch if k[2] > 0]  # the same samples, in the same order
        assert len(real) == single.global_count(step) == ranks[0].global_count(step)
    seen = [k[0] for b in single for k in b if k[2] > 0]
    assert sorted(seen) == list(range(n))  # every sample once per epoch


def test_order_changes_with_epoch_and_seed():
    a = samplers.epoch_order(50, 0, 0)
    assert a != samplers.epoch_order(50, 0, 1) and a != samplers.epoch_order(50, 1, 0) and a == samplers.epoch_order(50, 0, 0)


def test_eval_shards_cover_each_sample_once_in_the_batches_of_one_process():
    for n, world in [(13, 2), (3, 4), (100, 3), (18, 2)]:
        batches = [[k[0] for k in b] for r in range(world) for b in samplers.EvalBatchSampler(n, 4, world, r)]
        # every sample once, in order, and batch for batch what one process evaluates: the same
        # numbers for any world size (and the rule tl-dist evaluate shards by)
        assert batches == [[k[0] for k in b] for b in samplers.EvalBatchSampler(n, 4, 1, 0)]
        assert [i for b in batches for i in b] == list(range(n))


def test_eval_transform_matches_seed_pipeline(tiny_data):
    path = next((tiny_data / "val" / "ants").iterdir())
    img = Image.open(path).convert("RGB")
    seed_tf = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(),
                                  transforms.Normalize(config.IMAGENET_MEAN, config.IMAGENET_STD)])
    ours = augment.normalize(augment.eval_transform(img, 36, 32)[None], config.IMAGENET_MEAN, config.IMAGENET_STD, False)
    torch.testing.assert_close(ours[0], seed_tf(img), atol=1e-5, rtol=0)


def test_train_transform_is_seed_crop_with_per_sample_draws(tiny_data):
    cfg = _data_cfg(["data.image_size=32"])
    img = Image.open(next((tiny_data / "train" / "bees").iterdir())).convert("RGB")
    a = augment.train_transform(img, augment.sample_rng(0, 1, 5), cfg)
    assert torch.equal(a, augment.train_transform(img, augment.sample_rng(0, 1, 5), cfg))  # same key, same draw
    assert not torch.equal(a, augment.train_transform(img, augment.sample_rng(0, 2, 5), cfg))
    # The same crop parameters through torchvision's own functional path give the same pixels.
    i, j, h, w = augment.rrc_params(augment.sample_rng(0, 1, 5), img.width, img.height, cfg.scale, cfg.ratio)
    ref = transforms.functional.resized_crop(img, i, j, h, w, [32, 32])
    ref_flipped = transforms.functional.hflip(ref)
    got = a.permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.asarray(ref)) or np.array_equal(got, np.asarray(ref_flipped))


def test_rrc_params_have_torchvisions_distribution():
    """Same algorithm as RandomResizedCrop.get_params, only the random source differs."""
    img = Image.new("RGB", (400, 300))
    torch.manual_seed(0)
    ours, ref = [], []
    for k in range(3000):
        i, j, h, w = augment.rrc_params(augment.sample_rng(0, 0, k), 400, 300, [0.08, 1.0], [3 / 4, 4 / 3])
        assert 0 <= i <= 300 - h and 0 <= j <= 400 - w
        ours.append((h * w / 120000, w / h, (j + w / 2) / 400))
        _, _, h, w = transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        ref.append((h * w / 120000, w / h, 0.5))
    ours, ref = np.array(ours), np.array(ref)
    assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.02  # area
    assert abs(ours[:, 1].mean() - ref[:, 1].mean()) < 0.02  # aspect ratio
    assert ours[:, 0].min() >= 0.075 and ours[:, 1].min() > 0.7 and ours[:, 1].max() < 1.4
    assert abs(ours[:, 2].mean() - 0.5) < 0.02  # crop centres not biased to one side


def test_augmentation_independent_of_workers(tiny_data):
    cfg = _data_cfg(["data.image_size=32", "data.cache=none"])
    classes, train, val = listing.list_splits(str(tiny_data))
    batches = []
    for workers in (0, 2):
        cfg.num_workers = workers
        d = loaders.build(cfg, classes, train, val, seed=1)
        d.train_sampler.set_epoch(3)
        batches.append(torch.cat([b[0] for b in d.train_loader]))
    assert torch.equal(batches[0], batches[1])


def test_cache_gives_same_pixels(tiny_data):
    classes, train, val = listing.list_splits(str(tiny_data))
    out = []
    for cache in ("none", "ram"):
        cfg = _data_cfg(["data.image_size=32", "data.resize_size=36", "data.num_workers=0",
                                 f"data.cache={cache}"])
        d = loaders.build(cfg, classes, train, val, seed=0)
        assert (d.cache != "none") == (cache == "ram")
        out.append((torch.cat([b[0] for b in d.train_loader]), torch.cat([b[0] for b in d.val_loader])))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_path_matches_the_pil_path(tiny_data, interpolation):
    """cache: device draws the same crops and flips as the PIL path; only the resampling runs in
    torch instead of Pillow, so the pixels nearly match. Labels, weights, order and val are exact."""
    classes, train, val = listing.list_splits(str(tiny_data))
    out = {}
    for cache in ("ram", "device"):
        cfg = _data_cfg(["data.image_size=32", "data.resize_size=36", "data.num_workers=0",
                         "data.batch_size=5", f"data.cache={cache}", f"data.interpolation={interpolation}"])
        d = loaders.build(cfg, classes, train, val, seed=0, world=2, rank=1)
        assert d.cache == cache
        d.train_sampler.set_epoch(2)
        out[cache] = (list(d.train_loader), list(d.val_loader))
    for (a, b) in ((out["ram"][0], out["device"][0]), (out["ram"][1], out["device"][1])):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(x[1:], y[1:]))  # labels, weights, indices
            assert x[0].dtype == y[0].dtype == torch.uint8 and x[0].shape == y[0].shape
    train_ram, train_dev = (torch.cat([b[0] for b in out[c][0]]).float() for c in ("ram", "device"))
    diff = (train_ram - train_dev).abs()
    # of 255. Measured: mean 0.083 (bilinear) / 0.093 (bicubic), max 1 (torch's float resampling, as
    # on a GPU, against Pillow's fixed point; deterministic for this data); a wrong flip gives 30.
    assert diff.mean() < 0.1 and diff.max() <= 2
    assert torch.equal(torch.cat([b[0] for b in out["ram"][1]]), torch.cat([b[0] for b in out["device"][1]]))


def test_a_device_path_that_disagrees_with_pil_falls_back_to_the_host_path(tiny_data, monkeypatch):
    """The device path checks its first batch against the PIL path; a fault there (here: every image
    flipped) is caught before training and the run gets the host path, with a warning."""
    from tl_dist.data import device_cache
    classes, train, val = listing.list_splits(str(tiny_data))
    real = device_cache.crop_resize_flip
    monkeypatch.setattr(device_cache, "crop_resize_flip", lambda *a, **k: real(*a, **k).flip(-1))
    over = ["data.image_size=32", "data.resize_size=36", "data.num_workers=0", "data.batch_size=5"]
    d = loaders.build(_data_cfg([*over, "data.cache=device"]), classes, train, val, seed=0)
    assert d.cache == "ram" and "disagrees with the PIL path on the first batch" in d.warning
    ref = loaders.build(_data_cfg([*over, "data.cache=ram"]), classes, train, val, seed=0)
    assert ref.warning is None
    for a, b in zip(d.train_loader, ref.train_loader):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_device_crop_resize_flip_close_to_pil():
    from tl_dist.data.device_cache import crop_resize_flip
    rng = np.random.default_rng(0)
    arr = (rng.random((90, 120, 3)) * 40 + np.linspace(0, 200, 120)[None, :, None]).astype(np.uint8)
    img = Image.fromarray(arr)
    box = (10, 20, 60, 80)  # top, left, height, width
    ref = augment.to_uint8_chw(transforms.functional.hflip(transforms.functional.resized_crop(
        img, *box, [32, 32], antialias=True)))
    ours = crop_resize_flip([augment.to_uint8_chw(img)], [box], [True], 32)[0]
    d = (ref.float() - ours.float()).abs()
    assert d.mean() < 0.5 and d.max() <= 2
    unflipped = crop_resize_flip([augment.to_uint8_chw(img)], [box], [False], 32)[0]
    assert torch.equal(unflipped.flip(-1), ours)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_device_resampling_equals_interpolate_to_the_bit(mode):
    """The batch is resampled through the kernel F.interpolate dispatches to, called directly (less
    host time per image): the same bits, for crops shrunk and enlarged, in one batch."""
    from tl_dist.data import device_cache
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((90, 120), (61, 47), (200, 150))]
    boxes = [(10, 20, 60, 80), (0, 0, 61, 47), (5, 7, 190, 30)]
    flips = [False, True, False]
    ours = device_cache.crop_resize_flip(images, boxes, flips, 48, mode)
    for k, (img, (i, j, h, w)) in enumerate(zip(images, boxes)):
        ref = torch.nn.functional.interpolate(img[None, :, i:i + h, j:j + w].float(), size=(48, 48), mode=mode,
                                              antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(ours[k], ref.flip(-1) if flips[k] else ref), k
    assert device_cache._RESAMPLE[mode] is not None  # (the direct path ran, not the fallback)


def test_cache_auto_picks_the_fastest_place_that_fits(monkeypatch):
    """800x600 photos: 1.44 MB decoded each. On a GPU the default budget is half its memory."""
    train = [(f"t{i}.jpg", 0) for i in range(1000)]  # 1.44 GB decoded
    sizes = {p: (800, 600) for p, _ in train}
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    place = lambda device, *over: loaders.cache_place(_data_cfg(list(over)), train, [], sizes, device)  # noqa: E731
    monkeypatch.setattr(loaders, "gpu_memory_bytes", lambda device: 4 * 2**30)
    assert place(cuda) == "device"  # 1.44 GB within half of 4 GiB
    assert place(cuda, "data.device_cache_gb=1") == "ram"  # the budget set: not within it; RAM's 4 GiB is
    monkeypatch.setattr(loaders, "gpu_memory_bytes", lambda device: 2 * 2**30)
    assert place(cuda) == "ram"
    assert place(cuda, "data.device_cache_gb=0", "data.cache_gb=1") == "none"
    assert place(cpu) == "ram"  # never the device cache on the CPU
    assert place(cuda, "data.cache=device") == "device"  # as configured


def test_a_symlink_loop_in_the_data_tree_is_named_not_followed_forever(tmp_path):
    root = make_images(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    (root / "train" / "cat" / "loop").symlink_to("..")
    with pytest.raises(UserError, match=r"symbolic link loop: .*through the link .*train/cat/loop\)"):
        listing.list_splits(str(root))


def test_linked_folders_are_followed_by_training_and_prediction_alike(tmp_path):
    from tl_dist.commands.predict import expand
    root = make_images(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    extra = make_images(tmp_path / "extra", {"more": {"cat": 3}})
    (root / "train" / "cat" / "linked").symlink_to(extra / "more" / "cat")
    _, train, _ = listing.list_splits(str(root))
    listed = [p for p, _ in train if p.startswith(str(root / "train" / "cat"))]
    assert len(listed) == 5 and expand([str(root / "train" / "cat")]) == listed


def test_a_cuda_error_in_the_device_path_is_one_line_naming_the_key(tiny_data, monkeypatch):
    pass

    def fault(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
    classes, train, val = listing.list_splits(str(tiny_data))
    d = loaders.build(_data_cfg(["data.image_size=32", "data.num_workers=0", "data.cache=device"]), classes, train, val,
                   seed=0)
    monkeypatch.setattr(device_cache, "crop_resize_flip", fault)
    with pytest.raises(UserError) as e:
        next(iter(d.train_loader))
    msg = str(e.value)
    assert msg.startswith("data.cache=device: CUDA error: an illegal memory access") and "\n" not in msg
    assert "while augmenting on the device; set data.cache=ram" in msg


@pytest.mark.parametrize("n, bs, world", [(22, 4, 2), (13, 2, 3)])
def test_the_balanced_sampler_is_one_global_order_with_distinct_draws_for_repeats(n, bs, world):
    labels = [0] * (n - 3) + [1] * 3  # a rare class
    single = samplers.TrainBatchSampler(n, bs * world, 1, 0, seed=3, balanced_labels=labels)
    ranks = [samplers.TrainBatchSampler(n, bs, world, r, seed=3, balanced_labels=labels) for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    for step, batch in enumerate(single):
        real = [k[:2] for p in per_rank for k in p[step] if k[2] > 0]
        assert real == [k[:2] for k in batch if k[2] > 0]  # same images and draw keys for any world size
    keys = [k[:2] for b in single for k in b if k[2] > 0]
    assert len(keys) == n and len(set(keys)) == n  # an image drawn twice gets other augmentation draws
    assert all(e == 2 or e % samplers.REPEAT_STRIDE == 2 for _, e in keys)


def test_the_balanced_sampler_evens_out_the_classes():
    labels = [0] * 90 + [1] * 10
    drawn = [labels[i] for epoch in range(20) for i in samplers.balanced_order(labels, 0, epoch)]
    assert 0.45 < sum(drawn) / len(drawn) < 0.55  # the 10% class drawn about half the time
    assert samplers.balanced_order(labels, 0, 1) == samplers.balanced_order(labels, 0, 1) != samplers.balanced_order(labels, 0, 2)
