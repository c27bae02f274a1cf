"""tl-dist preview: the data's summary and a picture of what the train transform does, before training."""
from PIL import Image

from tl_dist.commands import preview

from .conftest import FAST, ROOT, make_images


def args(data, *extra):
    return [str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={data}", "data.demo=false", *extra]


def test_preview_summarises_the_data_and_draws_every_class(tiny_data, tmp_path, capsys):
    out = tmp_path / "p.png"
    assert preview.main([*args(tiny_data), "--out", str(out), "--per-class", "3"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"data: {tiny_data} (folders), 2 classes"
    rows = {line.split()[0]: line.split()[1:] for line in said[2:5]}
    assert rows == {"ants": ["11", "7"], "bees": ["11", "6"], "images": ["22", "13"]}
    assert "bad-image scan: 0 bad" in said and any(l.startswith("train transform: RandomResizedCrop(32, scale=[0.08")
                                                   for l in said)
    assert any("data.scale=[0.08, 1.0] crops as little as 8%" in l for l in said)
    with Image.open(out) as im:
        assert im.info.get("Software") == "tl_dist"  # (ours: a second preview may replace it)
    assert preview.main([*args(tiny_data), "--out", str(out)]) == 0
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    assert preview.main([*args(tiny_data), "--out", str(mine)]) == 2
    assert mine.read_bytes() == b"a user's picture" and "--force" in capsys.readouterr().err


def test_preview_notes_flips_on_symbols_and_writes_nothing_else(tmp_path, capsys):
    digits = make_images(tmp_path / "digits", {"train": {"2": 3, "5": 3}, "val": {"2": 1, "5": 1}})
    assert preview.main(args(digits, f"train.output_dir={tmp_path / 'run'}", "data.augment=none")) == 0
    assert "mirrors train images" not in capsys.readouterr().out  # (no flips without augmentation)
    assert preview.main(args(digits, f"train.output_dir={tmp_path / 'run'}")) == 0
    assert "classes look like digits or letters, and data.hflip=true" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["preview.png"]
    assert preview.main(args(tmp_path / "nothing_here")) == 2


def test_the_predictions_picture_shows_mistakes_first_and_every_class(tiny_data):
    import torch

    from tl_dist import config, visualize
    from tl_dist.data.listing import list_data
    from tl_dist.data.loaders import ImageDataset
    from tl_dist.training.engine import StepSettings

    cfg = config.load(None, [f"data.root={tiny_data}", "data.image_size=32", "data.resize_size=36",
                             "data.interpolation=bilinear"]).data
    data = list_data(cfg)
    ds = ImageDataset(data.val, cfg, train=False, seed=0)  # 7 ants, then 6 bees

    class SaysAnts(torch.nn.Module):  # sure of ants, the surer the brighter the image
        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), torch.full((len(x),), -5.0)], 1)
    settings = StepSettings([0.5] * 3, [0.25] * 3, False, True, "eval")
    chosen = visualize._mistakes_first(SaysAnts(), ds, list(range(len(ds))), settings, torch.device("cpu"), 8)
    labels = [data.val[i][1] for i in chosen]
    assert labels[:4] == [1, 1, 1, 1] and 0 in labels and len(chosen) == len(set(chosen)) == 8
    brightness = [float(ds[(i, 0, 1.0)][0].float().mean()) for i in chosen[:4]]
    assert brightness == sorted(brightness, reverse=True)  # the most confident mistakes first
