"""A notebook run: parameters checked first, outputs that follow the preset and appear together,
checkpoints named by what shaped them."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common.model import GPT, GPTConfig  # noqa: E402
from common.notebook import check_knob, show_source, start_run  # noqa: E402
from common.runtime import PROJECT_ROOT, resolve_preset, run_paths  # noqa: E402
from common.train import TrainConfig, lm_batches, train  # noqa: E402


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMER_FAMILY_BUILD", str(tmp_path / "build"))
    return tmp_path / "build"


def figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    return fig


@pytest.mark.parametrize("smoke, preset", [(True, "cpu"), (True, "auto"), (False, "smoke")])
def test_smoke_runs_never_write_the_project_outputs(build, smoke, preset):
    """SMOKE=True, or PRESET='smoke' alone (as `papermill -p PRESET smoke` does), goes to build/smoke."""
    run = start_run("99_test", smoke=smoke, preset=preset)
    assert run.preset == "smoke"
    assert run.paths.results == build / "smoke" / "results"
    assert run.paths.figures == build / "smoke" / "figures"
    assert PROJECT_ROOT not in run.paths.results.parents or build in run.paths.results.parents


def test_reference_preset_writes_the_project_and_gpu_its_own_folder():
    paths = run_paths(None, "cpu")
    assert paths.results == PROJECT_ROOT / "results" and paths.figures == PROJECT_ROOT / "figures"
    if torch.cuda.is_available():
        assert run_paths(None, "gpu").results == PROJECT_ROOT / "results" / "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the gpu preset is allowed")
def test_gpu_preset_without_cuda_is_refused():
    with pytest.raises(ValueError, match="PRESET='gpu' needs a CUDA device"):
        resolve_preset("gpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(smoke="false"), "SMOKE must be True or False"),
    (dict(smoke=1), "SMOKE must be True or False"),
    (dict(seed="abc"), "SEED must be int"),
    (dict(seed=True), "SEED must be int"),
    (dict(seed=-1), r"SEED must be in \[0"),
    (dict(preset="tpu"), "PRESET must be 'auto' or one of"),
    (dict(out_dir=3), "OUT_DIR must be"),
])
def test_bad_parameters_are_refused_before_anything_runs(build, kwargs, message):
    with pytest.raises(ValueError, match=message):
        start_run("99_test", **kwargs)


def test_figures_and_results_appear_together(tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "99_old.png").write_bytes(b"from an older run")
    (out / "figures" / "98_other.png").write_bytes(b"another notebook")
    run = start_run("99_test", smoke=True, out_dir=out)
    run.save_figure(figure(), "curve")
    assert not (out / "figures" / "99_curve.png").exists()  # staged until the results are saved
    assert (out / "figures" / "99_old.png").exists()
    run.save_results({"accuracy": 0.5})
    assert (out / "figures" / "99_curve.png").stat().st_size > 1000
    assert not (out / "figures" / "99_old.png").exists()  # not made by this run: removed
    assert (out / "figures" / "98_other.png").exists()
    payload = json.loads((out / "results" / "99_test.json").read_text())
    assert payload["metrics"] == {"accuracy": 0.5} and payload["preset"] == "smoke"
    assert not run.paths.staging.exists()
    with pytest.raises(RuntimeError, match="save every figure before the results"):
        run.save_figure(figure(), "late")


def test_an_interrupted_run_leaves_the_last_complete_outputs(tmp_path):
    out = tmp_path / "out"
    first = start_run("99_test", smoke=True, out_dir=out)
    first.save_figure(figure(), "curve")
    first.save_results({"accuracy": 0.5})
    before = (out / "figures" / "99_curve.png").read_bytes()

    second = start_run("99_test", smoke=True, out_dir=out)
    fig = figure()
    fig.axes[0].plot([0, 1], [1, 0])
    second.save_figure(fig, "curve")
    second.save_figure(figure(), "extra")  # ... and the kernel dies before save_results
    assert (out / "figures" / "99_curve.png").read_bytes() == before
    assert not (out / "figures" / "99_extra.png").exists()
    assert json.loads((out / "results" / "99_test.json").read_text())["metrics"] == {"accuracy": 0.5}
    third = start_run("99_test", smoke=True, out_dir=out)  # a new run clears what the dead one staged
    assert not third.paths.staging.exists()


def test_checkpoint_names_follow_what_shaped_them(tmp_path, capsys):
    run = start_run("99_test", smoke=True, out_dir=tmp_path)
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_layers=1, n_heads=2)
    same = run.checkpoint("gpt", {"steps": 4}, config)
    assert same == run.checkpoint("gpt", {"steps": 4}, config)
    other = run.checkpoint("gpt", {"steps": 5}, config)
    assert other != same and other.parent == same.parent == tmp_path / "checkpoints"
    assert run.checkpoint("gpt", {"steps": 4}, GPTConfig(vocab_size=11, context_length=8, d_model=16,
                                                         n_layers=2, n_heads=2)) != same
    with pytest.raises(ValueError, match="pass what shapes it"):
        run.checkpoint("gpt")


def test_stale_checkpoint_is_announced_and_not_loaded(tmp_path, capsys):
    run = start_run("99_test", smoke=True, out_dir=tmp_path)
    config = GPTConfig(vocab_size=11, context_length=8, d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    ids = torch.arange(200) % 11
    first = run.checkpoint("gpt", TrainConfig(steps=3, warmup_steps=1), config)
    train(GPT(config), lm_batches(ids, 2, 8), TrainConfig(steps=3, warmup_steps=1), checkpoint_path=first,
          progress=False)
    capsys.readouterr()
    changed = run.checkpoint("gpt", TrainConfig(steps=3, warmup_steps=1, lr=1e-3), config)
    assert not changed.exists()
    assert "not loading 1 checkpoint(s) of 'gpt'" in capsys.readouterr().out
    seconds = run.training_seconds()
    assert seconds["train_s"] > 0 and seconds["train_s_earlier_sessions"] == 0
    later = start_run("99_test", smoke=True, out_dir=tmp_path)  # a later session loads the finished checkpoint
    assert later.checkpoint("gpt", TrainConfig(steps=3, warmup_steps=1), config) == first
    assert later.training_seconds()["train_s_earlier_sessions"] == seconds["train_s"]


@pytest.mark.parametrize("args, message", [
    (("WINDOW", 64, int, [16, 128]), r"WINDOW must be one of \[16, 128\], got 64"),
    (("LOSS", -1, float, None, 0, 100), r"LOSS must be in \[0, 100\], got -1"),
    (("LOSS", "0.5", float), "LOSS must be float, got '0.5'"),
    (("STEPS", 2.5, int), "STEPS must be int"),
    (("THRESHOLD", float("nan"), float, None, 0, 1), "THRESHOLD must be a number"),
])
def test_check_knob_says_what_is_allowed(args, message):
    with pytest.raises(ValueError, match=message):
        check_knob(*args)


def test_check_knob_accepts_what_is_allowed():
    assert check_knob("WINDOW", 128, int, [16, 128]) == 128
    assert check_knob("LOSS", 1, float, low=0, high=100) == 1
    assert check_knob("MODEL", None, str, allow_none=True) is None


def test_show_source_picks_key_lines_and_refuses_walls_of_code():
    text = show_source(check_knob, "if choices is not None", "raise ValueError")
    assert text.splitlines()[0] == "if choices is not None:" and text.splitlines()[-1].lstrip().startswith("raise")
    with pytest.raises(ValueError, match="at most 3 fit a slide"):
        show_source(check_knob, max_lines=3)
    with pytest.raises(ValueError, match="contains 'no such line'"):
        show_source(check_knob, "no such line")
