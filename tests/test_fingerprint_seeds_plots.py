"""Fingerprints that change with settings and code, seeds summarised with intervals, plot helpers."""

import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common import fingerprint as fp  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.plots import draw_reference_levels, plain_log_ticks, plot_with_interval  # noqa: E402
from common.seeds import can_fork, run_in_processes, run_seed_grid, run_seeds, side_by_side_workers  # noqa: E402
from common.stats import mean_ci  # noqa: E402
from common.train import TrainConfig  # noqa: E402


def test_fingerprint_follows_settings():
    a = fp.fingerprint({"steps": 10}, TrainConfig(steps=10, warmup_steps=1))
    assert a == fp.fingerprint({"steps": 10}, TrainConfig(steps=10, warmup_steps=1))
    assert a != fp.fingerprint({"steps": 11}, TrainConfig(steps=10, warmup_steps=1))
    assert a != fp.fingerprint({"steps": 10}, TrainConfig(steps=10, warmup_steps=1, lr=1e-4))
    with pytest.raises(ValueError, match="at least one part"):
        fp.fingerprint()


def test_fingerprint_of_a_model_covers_its_architecture():
    small = GPT(GPTConfig(vocab_size=11, context_length=8, d_model=16, n_layers=1, n_heads=2))
    deeper = GPT(GPTConfig(vocab_size=11, context_length=8, d_model=16, n_layers=2, n_heads=2))
    assert fp.fingerprint(small) != fp.fingerprint(deeper)


def test_code_digest_changes_with_code_but_not_comments(tmp_path):
    """A copy of the package where one module imported by another is edited."""
    root = tmp_path / "project"
    shutil.copytree(fp.ROOT / "common", root / "common", ignore=shutil.ignore_patterns("__pycache__"))

    def digest():
        return fp.code_digest(["common.model"], root)  # imports common.attention

    before = digest()
    attention = root / "common" / "attention.py"
    attention.write_text(attention.read_text() + "\n# a comment changes nothing\n")
    assert digest() == before
    attention.write_text(attention.read_text() + "\nCHANGED = 1\n")
    assert digest() != before
    assert "common.attention" in fp.modules_used((), root, start=["common.model"])


def test_run_seeds_collects_and_summarises(tmp_path):
    seen = []

    def train_one(seed, path):
        seen.append((seed, path))
        return {"ppl": 100.0 + seed, "acc": {"copy": 0.5 + 0.1 * seed}}

    runs = run_seeds(train_one, [0, 1, 2], checkpoint_for=lambda seed: tmp_path / f"s{seed}.pt", name="dense",
                     verbose=False)
    assert seen == [(s, tmp_path / f"s{s}.pt") for s in (0, 1, 2)]
    assert runs.values("ppl") == [100.0, 101.0, 102.0]
    assert runs.values("acc.copy") == pytest.approx([0.5, 0.6, 0.7])
    summary = runs.summary("ppl")
    assert summary["mean"] == 101.0 and summary["seeds"] == [0, 1, 2]
    assert summary["ci"] == pytest.approx([mean_ci([100, 101, 102]).low, mean_ci([100, 101, 102]).high])
    with pytest.raises(KeyError, match="missing"):
        runs.values("missing")


def tiny_training(experiment, seed, path):
    """A few SGD steps of a small linear model: the metrics depend on the experiment and the seed."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * experiment)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"loss": loss.item(), "path": str(path), "threads": torch.get_num_threads()}


@pytest.mark.skipif(not can_fork(), reason="processes are forked only on Linux without CUDA")
def test_run_seed_grid_in_processes_equals_one_after_another(tmp_path):
    checkpoint = lambda experiment, seed: tmp_path / f"e{experiment}-s{seed}.pt"
    forked = run_seed_grid(tiny_training, [1, 2], [0, 1, 2], checkpoint, workers=2, verbose=False)
    in_process = run_seed_grid(tiny_training, [1, 2], [0, 1, 2], checkpoint, workers=1, verbose=False)
    for experiment in (1, 2):
        assert forked[experiment].values("loss") == in_process[experiment].values("loss")
        assert [m["path"] for m in forked[experiment].metrics] == [str(checkpoint(experiment, s)) for s in (0, 1, 2)]
        assert {m["threads"] for m in forked[experiment].metrics} == {1}  # one thread per process
    assert forked[1].values("loss") != forked[2].values("loss")


@pytest.mark.skipif(not can_fork(), reason="processes are forked only on Linux without CUDA")
def test_run_in_processes_reports_a_failing_job_with_its_traceback():
    def fails():
        raise ArithmeticError("no such thing")

    with pytest.raises(RuntimeError, match="(?s)'bad'.*ArithmeticError: no such thing"):
        run_in_processes({"good": lambda: 1, "bad": fails}, workers=2)
    assert run_in_processes({"a": lambda: 1, "b": lambda: 2, "c": lambda: 3}, workers=2) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("workers", [0, 1.5, True])
def test_run_seed_grid_refuses_bad_workers(workers):
    with pytest.raises(ValueError, match="workers"):
        run_seed_grid(tiny_training, [1], [0], workers=workers)


@pytest.mark.parametrize("seeds", [[], [0, 0], [-1], ["a"]])
def test_run_seeds_refuses_bad_seeds(seeds):
    with pytest.raises(ValueError, match="seeds"):
        run_seeds(lambda seed, path: {}, seeds)


def test_reference_levels_and_intervals_are_drawn_and_labelled():
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [150, 160, 170])
    plot_with_interval(ax, [0, 1, 2], [{"mean": 150, "ci": [145, 155]}, (160, 150, 170),
                                       mean_ci([168, 170, 172])], label="model")
    plot_with_interval(ax, [0, 1], [(150, 140, 160), (155, 150, 160)], label="band", band=True)
    draw_reference_levels(ax, {"bigram": 200.0, "trigram": 158.0})
    labels = ax.get_legend_handles_labels()[1]
    assert "count trigram: 158" in labels
    assert any(label.startswith("count bigram: 200 (off scale, above)") for label in labels)
    assert ax.get_ylim()[1] < 200  # the off-scale level did not squash the data
    plt.close(fig)


@pytest.mark.parametrize("low, high", [(120, 700), (0.9, 40), (1.5, 1.9)])
def test_plain_log_ticks_label_a_log_axis_with_plain_numbers(low, high):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [low, high])
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    shown = [(tick.get_loc(), tick.label1.get_text()) for tick in ax.yaxis.get_major_ticks()
             if low <= tick.get_loc() <= high]
    plt.close(fig)
    assert shown, "no labelled tick inside the range"
    for value, text in shown:
        assert float(text) == pytest.approx(value, rel=1e-3)  # a plain number, not 10^k notation


def test_fingerprint_of_an_object_follows_its_class_and_attributes_not_its_address():
    """A task object (a plain class instance) must give the same key in every process, so a
    finished checkpoint is found again; its settings and its class's code still count."""
    from functools import partial

    from common.tasks import InductionHeads, SelectiveCopying, task_batches

    assert fp.fingerprint(SelectiveCopying(64, 4, 8)) == fp.fingerprint(SelectiveCopying(64, 4, 8))
    assert fp.fingerprint(SelectiveCopying(64, 4, 8)) != fp.fingerprint(SelectiveCopying(64, 4, 9))
    assert fp.fingerprint(SelectiveCopying(64, 4, 8)) != fp.fingerprint(InductionHeads(64, 8))
    nested = {"task": InductionHeads(32, 8), "batches": partial(task_batches, InductionHeads(32, 8), 4)}
    assert fp.fingerprint(nested) == fp.fingerprint({"task": InductionHeads(32, 8),
                                                     "batches": partial(task_batches, InductionHeads(32, 8), 4)})
    assert " at 0x" not in fp._describe(nested)
    import torch

    from common.tasks import PlantedCopy

    assert fp.fingerprint({"t": torch.arange(5000)}) != fp.fingerprint({"t": torch.arange(5000).flip(0)})
    assert fp.fingerprint(PlantedCopy(64, 16, 8, 4)) == fp.fingerprint(PlantedCopy(64, 16, 8, 4))


def test_fingerprint_of_tensors_follows_dtype_and_content_bfloat16_included():
    import numpy as np
    import torch

    half = torch.linspace(-1, 1, 7, dtype=torch.bfloat16)
    assert fp.fingerprint(half) == fp.fingerprint(half.clone())
    assert fp.fingerprint(half) != fp.fingerprint(half.to(torch.float16))
    assert fp.fingerprint(half) != fp.fingerprint(half.flip(0))
    assert fp.fingerprint(torch.ones(3)) == fp.fingerprint(np.ones(3, dtype=np.float32))  # same dtype name


def test_side_by_side_workers_one_per_thread_on_a_cpu_only():
    assert side_by_side_workers(torch.device("cpu")) == torch.get_num_threads()
    assert side_by_side_workers(torch.device("cuda")) == 1
