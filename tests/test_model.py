import pickle

import pytest
import torch
from safetensors.torch import save_file

from tl_dist import config
from tl_dist.models import backbones, heads
from tl_dist.errors import UserError


def _cfg(*over):
    return config.load(None, list(over)).model


def test_finetune_trains_everything_frozen_only_fc():
    m = backbones.build(_cfg("model.weights=none"), 3)
    assert m.fc.out_features == 3 and all(p.requires_grad for p in m.parameters())
    f = backbones.build(_cfg("model.weights=none", "model.mode=frozen"), 3)
    assert [n for n, p in f.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_frozen_backbone_stays_in_eval_mode_unless_seed_behaviour():
    f = backbones.build(_cfg("model.weights=none", "model.mode=frozen"), 2)
    heads.set_train_mode(f, True, frozen=True, frozen_bn="eval")
    assert f.fc.training and not f.bn1.training and not f.layer4[1].bn2.training
    heads.set_train_mode(f, True, frozen=True, frozen_bn="train")
    assert f.bn1.training


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_loaded_except_head(tmp_path, suffix):
    src = backbones.create("resnet18", 1000)
    state = src.state_dict()
    p = tmp_path / f"w{suffix}"
    save_file(state, str(p)) if suffix == ".safetensors" else torch.save(state, p)
    m = backbones.build(_cfg(f"model.weights={p}"), 2)
    torch.testing.assert_close(m.conv1.weight, src.conv1.weight, rtol=0, atol=0)
    assert m.fc.out_features == 2


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"conv1.weight": _Evil(str(marker))}, f)
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil2.pth")
    marker.unlink(missing_ok=True)
    for bad in (p, tmp_path / "evil2.pth"):
        with pytest.raises(UserError, match="refusing to load"):
            backbones.build(_cfg(f"model.weights={bad}"), 2)
    assert not marker.exists()


def test_wrong_weights_and_missing_file(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(p))
    with pytest.raises(UserError, match="do not fit"):
        backbones.build(_cfg(f"model.weights={p}"), 2)
    with pytest.raises(UserError, match="weights file not found"):
        backbones.build(_cfg(f"model.weights={tmp_path / 'nope.pth'}"), 2)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable safetensors"):
        backbones.build(_cfg(f"model.weights={tmp_path / 'junk.safetensors'}"), 2)


def test_imagenet_offline_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        backbones.build(_cfg("model.weights=imagenet"), 2)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg


def test_unknown_arch():
    with pytest.raises(UserError, match="unknown model.arch 'resnet19'"):
        backbones.build(_cfg("model.arch=resnet19", "model.weights=none"), 2)


def test_refused_pickle_message_keeps_the_warning_and_names_what_was_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UserError) as e:
        backbones.build(_cfg(f"model.weights={tmp_path / 'evil.pth'}"), 2)
    msg = str(e.value)
    assert "could run arbitrary code" in msg and "GLOBAL" in msg and "Re-running" not in msg
    assert not marker.exists()


def test_a_damaged_file_in_the_torch_hub_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x80\x04garbage" * 100)
    with pytest.raises(UserError, match="cached weights are damaged: .*resnet18-f37072fd.pth.*delete the file"):
        backbones.build(_cfg("model.weights=imagenet"), 2)
