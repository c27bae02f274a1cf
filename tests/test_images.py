import numpy as np
import pytest
from PIL import Image

from tl_dist.data.images import BadImage, check_file, load_rgb, scan_files


def _jpeg(path, size=(40, 30), **kw):
    rng = np.random.default_rng(0)  # noise: the file is mostly entropy-coded data, not header
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", **kw)
    return path


def test_scan_reports_each_bad_file_with_reason(tmp_path):
    good = _jpeg(tmp_path / "good.jpg", size=(120, 90))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:-200])
    png = tmp_path / "trunc.png"
    Image.new("RGB", (40, 30)).save(png)
    png.write_bytes(png.read_bytes()[:-20])
    missing = tmp_path / "missing.jpg"
    r = scan_files([str(p) for p in (good, empty, text, trunc, png, missing)])
    assert list(r.sizes) == [str(good)] and r.sizes[str(good)] == (120, 90)
    assert len(good.read_bytes()) > 2000
    assert "0 bytes" in r.bad[str(empty)]
    assert "not an image" in r.bad[str(text)]
    assert "truncated JPEG" in r.bad[str(trunc)]
    assert "truncated PNG" in r.bad[str(png)]
    assert "unreadable" in r.bad[str(missing)]


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    p = _jpeg(tmp_path / "big.jpg", size=(400, 400))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression bomb"):
        check_file(str(p))
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(str(p))


def test_unusual_but_valid_images_become_rgb(tmp_path):
    cases = {
        "grey.png": Image.new("L", (20, 10), 128),
        "palette.png": Image.new("P", (20, 10), 3),
        "rgba.png": Image.new("RGBA", (20, 10), (10, 20, 30, 128)),
        "cmyk.jpg": Image.new("CMYK", (20, 10), (0, 255, 255, 0)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (20, 10), name
    assert load_rgb(str(tmp_path / "cmyk.jpg")).getpixel((5, 5))[0] > 200  # CMYK red stays red
    # 16-bit greyscale: scaled to 8 bits, not clipped to white.
    arr = np.full((10, 20), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert abs(load_rgb(str(tmp_path / "g16.png")).getpixel((1, 1))[0] - 128) <= 1


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(str(tmp_path / "rot.jpg")).size == (20, 40)
