"""tl-dist doctor: the environment and the self-test on this machine; a failing feature is a FAIL row."""
import json

import pytest

from tl_dist.commands import doctor

from .conftest import run_cli


@pytest.mark.multiproc
def test_doctor_on_this_machine_passes_what_it_can_and_says_why_it_skips_the_rest():
    r = run_cli("-m", "tl_dist", "doctor", "--json", timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout.splitlines()[-1])
    env, rows = report["environment"], {c["feature"]: c for c in report["checks"]}
    assert report["ok"] and env["torch"] and env["cpu"]["cores"] >= 1 and "cached" in env["default_weights"]
    assert list(rows) == [feature for feature, _, _ in doctor.CHECKS]
    assert all(c["status"] in ("PASS", "SKIPPED") and c["detail"] for c in rows.values())
    for feature in ("fp32 train + predict", "channels-last", "RAM image cache", "background checkpoint writer",
                    "2-process group + rank check", "timm backbone"):  # (timm: in the [dev] extra)
        assert rows[feature]["status"] == "PASS", rows[feature]
    if not env["gpus"]:  # this machine's case in CI: the GPU rows are skipped, saying why
        for feature in ("device cache + GPU augmentation", "CUDA graph replay"):
            assert rows[feature]["status"] == "SKIPPED" and "no CUDA device" in rows[feature]["detail"]
        assert rows["2-process group + rank check"]["detail"].startswith("gloo, CPU")
    assert sum(c["seconds"] for c in rows.values()) < 120


def test_a_failing_feature_is_a_fail_row_naming_the_key_that_avoids_it_and_exit_1(monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("decoded pixels differ")
    monkeypatch.setattr(doctor.SelfTest, "ram_cache", broken)
    for method in ("fp32", "auto_precision", "channels_last", "two_processes", "timm_backbone"):  # (run above)
        monkeypatch.setattr(doctor.SelfTest, method, lambda self: "ok")
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "RAM image cache" in l)
    assert "FAIL" in line and "RuntimeError: decoded pixels differ (runs avoid it with data.cache=none)" in line
    assert "1 failed" in out and "mixed_precision auto =" in out
