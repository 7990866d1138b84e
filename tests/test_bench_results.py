import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common.bench import count_flops, peak_memory, throughput, time_call, time_interleaved  # noqa: E402
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
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not list(tmp_path.glob("*.part"))


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
    paths = run_paths(tmp_path / "out", smoke=True)
    assert paths.figures.is_dir() and paths.results.is_dir() and paths.checkpoints.is_dir()


def test_cpu_peak_memory_prints_nothing_to_the_native_stderr(capfd):
    assert peak_memory(lambda: torch.ones(256, 256)) >= 256 * 256 * 4
    assert capfd.readouterr().err == ""


def test_time_interleaved_gives_one_median_per_call():
    times = time_interleaved({"a": lambda: torch.ones(64, 64) @ torch.ones(64, 64), "b": lambda: None}, rounds=2)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, rounds=0)
