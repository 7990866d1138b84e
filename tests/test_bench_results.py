import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common import bench  # noqa: E402
from common.bench import (  # noqa: E402
    count_flops,
    fixed_threads,
    non_monotone,
    peak_memory,
    ratio_spread,
    throughput,
    time_call,
    time_interleaved,
    timed_sweep,
)
from common.plots import save_figure, use_style  # noqa: E402
from common.results import RunRecord, load_results, write_json  # noqa: E402
from common.runtime import resolve_preset, run_paths  # noqa: E402


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_peak_memory_sees_a_temporary_buffer():
    def make_and_drop():
        big = torch.ones(1_000_000)  # 4 MB
        return big.sum()

    assert 4_000_000 <= peak_memory(make_and_drop) < 8_000_000


def test_time_call_reports_spread():
    timing = time_call(lambda: sum(range(1000)), warmup=1, repeats=4)
    assert timing.repeats == 4 and timing.minimum <= timing.median <= timing.maximum
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)
    assert throughput(100, 2.0) == 50.0


def test_results_are_written_atomically_and_completely(tmp_path):
    record = RunRecord("00_test", "smoke", 0, torch.device("cpu"), tmp_path)
    record.save({"ppl": torch.tensor(12.5), "nan": float("nan"), "table": [(1, 2)]})
    payload = json.loads((tmp_path / "00_test.json").read_text())
    assert payload["metrics"] == {"ppl": 12.5, "nan": None, "table": [[1, 2]]}
    assert {"notebook", "preset", "seed", "device", "torch", "wall_s"} <= set(payload)
    assert list(tmp_path.iterdir()) == [tmp_path / "00_test.json"]  # no temporary left behind
    assert load_results(tmp_path)["00_test"]["preset"] == "smoke"
    # a write that fails half-way (the second key cannot be serialised) leaves the old file whole
    before = (tmp_path / "00_test.json").read_text()
    with pytest.raises(TypeError):
        write_json(tmp_path / "00_test.json", {"metrics": {"ppl": 1.0}, "broken": object()})
    assert (tmp_path / "00_test.json").read_text() == before
    assert list(tmp_path.iterdir()) == [tmp_path / "00_test.json"]


def test_save_figure_and_presets(tmp_path):
    use_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path, "00_line")
    assert path.exists() and path.stat().st_size > 1000
    assert resolve_preset("cpu", smoke=True) == "smoke"
    assert resolve_preset("auto") in ("cpu", "gpu")
    with pytest.raises(ValueError, match="PRESET"):
        resolve_preset("tpu")
    paths = run_paths(tmp_path / "out", "smoke")
    assert paths.figures.is_dir() and paths.results.is_dir() and paths.checkpoints.is_dir()


def test_cpu_peak_memory_prints_nothing_to_the_native_stderr(capfd):
    assert peak_memory(lambda: torch.ones(256, 256)) >= 256 * 256 * 4
    assert capfd.readouterr().err == ""


def test_time_interleaved_gives_a_timing_with_spread_per_call():
    times = time_interleaved({"a": lambda: time.sleep(0.002), "b": lambda: None}, rounds=7)
    assert set(times) == {"a", "b"}
    assert times["a"].repeats == 7 and len(times["a"].samples) == 7
    assert times["a"].q1 <= times["a"].median <= times["a"].q3 and times["a"].iqr >= 0
    assert times["a"].median >= 0.002 > times["b"].median
    ratio, spread = ratio_spread(times["a"], times["a"])
    assert ratio == 1.0 and spread == 0.0
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, rounds=0)


class FakeClock:
    """Stands in for time.perf_counter: a call 'takes' exactly the seconds it adds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_timed_sweep_remeasures_a_point_that_breaks_a_monotone_curve(monkeypatch):
    """Point 1 is slow the first time only (a hiccup of the machine): the sweep sees the curve fall from
    1 to 2, times both points again, and keeps the monotone values."""
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    planned = {1: [0.012, 0.002, 0.002], 2: [0.004, 0.004, 0.004], 3: [0.006, 0.006, 0.006]}

    def calls_at(point):
        return {"f": lambda: clock.spend(planned[point].pop(0))}

    sweep = timed_sweep(calls_at, [1, 2, 3], rounds=1, warmup=0, retries=2)
    assert sweep.medians("f") == pytest.approx([0.002, 0.004, 0.006])
    assert ("f", 1) in sweep.remeasured and ("f", 2) in sweep.remeasured and ("f", 3) not in sweep.remeasured
    assert sweep.violations == []


def test_timed_sweep_reports_a_fall_it_cannot_fix(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    sweep = timed_sweep(lambda p: {"f": lambda: clock.spend(0.01 if p == 1 else 0.001)}, [1, 2], rounds=1,
                        warmup=0, retries=1)
    assert sweep.violations == [("f", 2)]
    assert non_monotone([1.0, 2.0, 1.99, 1.0], tolerance=0.05) == [3]


def test_fixed_threads_restores_the_count():
    before = torch.get_num_threads()
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with fixed_threads(0):
            pass


def test_broken_results_file_is_named(tmp_path):
    (tmp_path / "02_x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"02_x\.json is not valid JSON"):
        load_results(tmp_path)
