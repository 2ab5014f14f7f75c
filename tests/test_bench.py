"""`python -m opd.bench` runs on a CPU and reports consistent figures."""
import json

from opd.bench import main


def test_bench_writes_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--model", "mini", "--batch", "3", "--steps", "2", "--iters", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["speedup"] == result["speedup"] > 0
    for side in ("ours", "reference_style"):
        fig = written[side]
        assert abs(fig["trajectories_per_second"] * fig["seconds_per_iteration"] - 3) < 1e-6
