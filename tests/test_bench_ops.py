"""``benchmarks/bench_ops.py`` on its small shapes: every op timed on both sides and
summarisable by ``python -m benchmarks``."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import bench_ops, suite
from benchmarks.common import device_name

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="the PyTorch side needs torch"
)


def test_quick_run_writes_every_op(tmp_path):
    bench_ops.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / f"ops_{device_name()}.json").read_text())
    quick = bench_ops.QUICK
    assert len(result["results"]) == sum(len(v) for v in quick.values())
    (b, h, w, ci, co) = quick["convs"][0]
    conv = next(r for r in result["results"] if r["op"].startswith("conv"))
    assert conv["op"] == f"conv 3x3 {ci}->{co} on {b}x{h}x{w}"
    assert conv["flop"] == 2 * b * h * w * ci * co * 9
    plain = [r for r in result["results"] if r["op"].startswith(("attention", "conv"))]
    assert plain and all(r["plain_jax_s"] > 0 for r in plain)
    rows = suite.rows_from_result("ops", result)
    assert [r["measure"] for r in rows] == [r["op"] for r in result["results"]]
    assert all(r["ratio"] > 0 and r["unit"] == "ms" for r in rows)
    md = (tmp_path / f"ops_{device_name()}.md").read_text()
    assert md.count("| conv 3x3") == len(quick["convs"])


def test_bad_repeats():
    with pytest.raises(SystemExit):
        bench_ops.main(["--repeats", "0"])
