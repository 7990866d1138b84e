import math

import pytest
import torch

from common.model import GPT, GPTConfig
from common.train import TrainConfig, evaluate_lm, lm_batches, lr_at, make_optimizer, read_checkpoint, train

IDS = torch.randint(0, 30, (4000,), generator=torch.Generator().manual_seed(0))


def make_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, context_length=16, d_model=32, n_layers=2, n_heads=2, dropout=0.1))


def config(**overrides):
    values = dict(steps=12, lr=3e-3, warmup_steps=3, eval_every=6, log_every=2, device="cpu", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def evaluate(model):
    return evaluate_lm(model, IDS[:500], 16, batch_size=8)


def test_training_lowers_the_loss_on_a_learnable_sequence():
    ids = torch.arange(3000) % 12  # a deterministic cycle: perfectly predictable
    model = make_model()
    before = evaluate_lm(model, ids[:400], 16)["loss"]
    state = train(model, lm_batches(ids, 16, 16), config(steps=60, eval_every=0), progress=False)
    assert evaluate_lm(model, ids[:400], 16)["loss"] < before / 3
    assert state.step == 60 and state.tokens_seen == 60 * 16 * 16


class Crash(Exception):
    pass


def crashing_after(calls, batches):
    """A batch source that dies on its ``calls + 1``-th call, like a killed process."""
    count = 0

    def next_batch(generator):
        nonlocal count
        count += 1
        if count > calls:
            raise Crash
        return batches(generator)

    return next_batch


def test_resume_from_checkpoint_continues_identically(tmp_path):
    straight = make_model()
    full = train(straight, lm_batches(IDS, 4, 16), config(), evaluate=evaluate, progress=False)

    path = tmp_path / "run.pt"
    with pytest.raises(Crash):  # checkpoint at step 6, crash during step 8
        train(make_model(), crashing_after(7, lm_batches(IDS, 4, 16)), config(checkpoint_every=6),
              evaluate=evaluate, checkpoint_path=path, progress=False)
    resumed = make_model()
    state = train(resumed, lm_batches(IDS, 4, 16), config(checkpoint_every=6), evaluate=evaluate,
                  checkpoint_path=path, progress=False)

    assert state.step == 12
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in state.history] == [h["loss"] for h in full.history]
    assert state.last_eval == full.last_eval

    # a finished run is loaded, not retrained
    again = make_model()
    train(again, crashing_after(0, lm_batches(IDS, 4, 16)), config(checkpoint_every=6),
          checkpoint_path=path, progress=False)
    for a, b in zip(straight.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    train(make_model(), lm_batches(IDS, 4, 16), config(steps=4), checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match="another TrainConfig"):
        train(make_model(), lm_batches(IDS, 4, 16), config(steps=8, lr=1e-2), checkpoint_path=path,
              progress=False)


def test_nan_loss_stops_with_a_clear_message():
    def broken_loss(model, batch):
        return model(batch[0], targets=batch[1]).loss * float("nan")

    with pytest.raises(FloatingPointError, match="step 0.*lr"):
        train(make_model(), lm_batches(IDS, 4, 16), config(), loss_fn=broken_loss, progress=False)


def test_schedule_warms_up_then_decays_to_floor():
    cfg = config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_weight_decay_skips_biases_norms_and_embeddings():
    model = make_model()
    groups = make_optimizer(model, config()).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.decoder.blocks[0].feed_forward.up.weight) in decayed
    assert id(model.token_embedding.weight) not in decayed
    assert id(model.decoder.norm.weight) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_evaluate_lm_matches_uniform_entropy_for_a_silent_model():
    model = make_model()
    torch.nn.init.zeros_(model.head.weight)  # tied: zero embeddings -> uniform predictions
    metrics = evaluate_lm(model, IDS[:300], 16)
    assert metrics["loss"] == pytest.approx(math.log(30), rel=1e-5)
    assert metrics["ppl"] == pytest.approx(30, rel=1e-4)


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", -1.0), ("warmup_steps", 50),
                                          ("grad_clip", 0.0), ("min_lr_ratio", 2.0)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        config(**{field: value})


def test_time_based_checkpoints_let_a_killed_run_resume(tmp_path):
    """checkpoint_seconds tiny: every step saves, so a crash loses at most the step it was in."""
    path = tmp_path / "run.pt"
    with pytest.raises(Crash):
        train(make_model(), crashing_after(5, lm_batches(IDS, 4, 16)), config(checkpoint_seconds=1e-9),
              checkpoint_path=path, progress=False)
    resumed = train(make_model(), lm_batches(IDS, 4, 16), config(checkpoint_seconds=1e-9),
                    checkpoint_path=path, progress=False)
    assert resumed.step == 12
    assert 0 < resumed.resumed_seconds < resumed.train_seconds  # five steps came from the first session
    full = train(make_model(), lm_batches(IDS, 4, 16), config(), progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_default_checkpoint_interval_is_periodic():
    assert TrainConfig().checkpoint_seconds > 0
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        TrainConfig(checkpoint_seconds=0)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint"])
def test_unreadable_checkpoint_names_the_file_and_the_fix(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=r"broken\.pt.*delete it"):
        train(make_model(), lm_batches(IDS, 4, 16), config(), checkpoint_path=path, progress=False)


def test_a_file_that_is_no_training_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(RuntimeError, match="not a training checkpoint"):
        read_checkpoint(path)
