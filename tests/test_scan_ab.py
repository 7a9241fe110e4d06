"""tools/scan_ab.py: loading kernel files side by side, its settings and its refusals (CPU); the timed comparison
itself on a GPU."""
import json
import os

import pytest
import torch

from tools import scan_ab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "models", "scan_triton.py")


def test_two_copies_load_side_by_side_with_a_setting():
    pytest.importorskip("triton")
    a, b = scan_ab.load(KERNEL), scan_ab.load(f"{KERNEL}:CHUNK=2,GROUP=1")
    assert a is not b and a._bwd_kernel is not b._bwd_kernel and callable(b._forward)
    assert (b.CHUNK, b.GROUP) == (2, 1) and a.CHUNK != 2 and a.GROUP != 1
    assert not hasattr(a, "selective_scan_triton")  # the op registrations are left out


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "257"], "--shapes takes LENGTHxBATCH"),
    (["--shapes", "0x8"], "--shapes takes LENGTHxBATCH"),
    ([__file__], "is not a scan kernel file"),
    (["/nonexistent/kernel.py"], "cannot read /nonexistent/kernel.py"),
    ([f"{KERNEL}:CHUNK"], "settings are NAME=integer"),
    ([f"{KERNEL}:NOT_A_CONSTANT=1"], "settings are NAME=integer"),
    ([f"{KERNEL}:CHUNK=two"], "settings are NAME=integer"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    pytest.importorskip("triton")
    if argv[0].startswith("--"):
        argv = [KERNEL] + argv
    assert scan_ab.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so(capsys):
    pytest.importorskip("triton")
    assert scan_ab.main([KERNEL]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compares_on_gpu(tmp_path):
    out = tmp_path / "ab.json"
    assert scan_ab.main([KERNEL, f"{KERNEL}:CHUNK=2", "--shapes", "17x4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"].endswith("CHUNK=2"), r["reverse"]) for r in rows] == [(False, False), (False, True),
                                                                            (True, False), (True, True)]
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows)
    # bf16 outputs, and dB and dC are atomic sums in any order: one bf16 step apart at most
    assert rows[0]["max_rel_diff_vs_first"] is None and rows[2]["max_rel_diff_vs_first"] < 2e-2
