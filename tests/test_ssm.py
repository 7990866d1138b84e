import pytest
import torch

from common.generate import generate
from common.model import GPTConfig
from common.ssm import (
    S4D,
    SSMGPT,
    Mamba,
    MambaConfig,
    S4DConfig,
    chunked_scan,
    mamba_block,
    s4d_block,
    sequential_scan,
    ssm_param_groups,
)
from common.train import TrainConfig, make_optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids paying thread synchronisation on every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scan_inputs(batch=2, length=37, E=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, E, generator=g)
    delta = torch.rand(batch, length, E, generator=g) * 0.5
    A = -torch.rand(E, N, generator=g) * 3 - 0.1
    B = torch.randn(batch, length, N, generator=g)
    C = torch.randn(batch, length, N, generator=g)
    h0 = torch.randn(batch, E, N, generator=g)
    return x, delta, A, B, C, h0


def explicit_recurrence(x, delta, A, B, C, h0):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t · h_t, written out element by element."""
    h = h0.clone()
    ys = torch.zeros_like(x)
    for t in range(x.size(1)):
        for b in range(x.size(0)):
            for e in range(x.size(2)):
                h[b, e] = torch.exp(delta[b, t, e] * A[e]) * h[b, e] + delta[b, t, e] * B[b, t] * x[b, t, e]
                ys[b, t, e] = (C[b, t] * h[b, e]).sum()
    return ys, h


def gpt_config(**overrides):
    return GPTConfig(**{**dict(vocab_size=50, context_length=32, d_model=16, n_layers=2, n_heads=2, dropout=0.0),
                        **overrides})


def test_sequential_scan_equals_the_explicit_recurrence():
    x, delta, A, B, C, h0 = scan_inputs(batch=1, length=6, E=3)
    y, h = sequential_scan(x, delta, A, B, C, h0)
    y_ref, h_ref = explicit_recurrence(x, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.parametrize("chunk", [None, 1, 4, 37, 64])
@pytest.mark.parametrize("block_elements", [2**21, 24 * 10, 1])  # one block, blocks of 10 positions, of 1
def test_chunked_scan_equals_the_sequential_scan(chunk, block_elements):
    x, delta, A, B, C, h0 = scan_inputs()
    y_ref, h_ref = sequential_scan(x, delta, A, B, C, h0)
    y, h = chunked_scan(x, delta, A, B, C, h0, chunk=chunk, block_elements=block_elements)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


STORE = pytest.mark.parametrize("store_elements", [0, 2**24], ids=["recompute", "store"])  # both backward paths


@STORE
def test_chunked_scan_gradients_equal_the_sequential_scan_gradients(store_elements):
    inputs = [t.double().requires_grad_() for t in scan_inputs(length=23)]
    grads = []
    for scan in (sequential_scan, lambda *a: chunked_scan(*a, chunk=5, block_elements=2 * 6 * 4 * 11,
                                                          store_elements=store_elements)):
        y, h = scan(*inputs)
        grads.append(torch.autograd.grad((y.sin().sum() + h.sum()), inputs))
    for g_seq, g_chunk in zip(*grads):
        torch.testing.assert_close(g_chunk, g_seq)


def test_chunked_scan_is_stable_with_strong_decay():
    x, delta, A, B, C, h0 = scan_inputs(length=300)
    y, h = chunked_scan(x, delta * 100, A, B, C, h0)  # Σ Δ A reaches ~ -1e5: exp(-cumsum) would overflow
    y_ref, _ = sequential_scan(x, delta * 100, A, B, C, h0)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_s4d_convolution_equals_the_recurrence():
    torch.manual_seed(0)
    layer = S4D(8, S4DConfig(state_size=16, kernel_chunk=7))  # the kernel is built in several chunks
    u = torch.randn(3, 50, 8)
    y_conv = layer(u)
    state, ys = None, []
    for t in range(u.size(1)):
        y, state = layer.step(u[:, t], state)
        ys.append(y)
    torch.testing.assert_close(y_conv, torch.stack(ys, dim=1), atol=1e-5, rtol=1e-4)


def test_s4d_keeps_float64_precision():
    """A float64 layer on a float64 input computes in float64: the two views agree to ~1e-15, not 1e-7."""
    torch.manual_seed(0)
    layer = S4D(8, S4DConfig(state_size=16, kernel_chunk=7)).double()
    u = torch.randn(3, 50, 8, dtype=torch.float64)
    y_conv = layer(u)
    state, ys = None, []
    for t in range(u.size(1)):
        y, state = layer.step(u[:, t], state)
        ys.append(y)
    assert y_conv.dtype == torch.float64
    assert (y_conv - torch.stack(ys, dim=1)).abs().max() < 1e-12


def test_s4d_runs_a_low_precision_input_in_float32():
    torch.manual_seed(0)
    layer = S4D(4, S4DConfig(state_size=8))
    u = torch.randn(2, 12, 4)
    y = layer(u.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(u.bfloat16().float()), atol=2e-2, rtol=2e-2)


def test_s4d_kernel_is_the_powers_of_the_discrete_state_matrix():
    torch.manual_seed(0)
    layer = S4D(4, S4DConfig(state_size=6))
    dtA, B_bar, C = layer.discretise()
    expected = torch.stack([2 * (C * torch.exp(dtA) ** k * B_bar).sum(-1).real for k in range(10)], dim=-1)
    torch.testing.assert_close(layer.kernel(10), expected, atol=1e-5, rtol=1e-5)  # K_l = C Ā^l B̄


def test_s4d_initialisation_follows_s4d_lin():
    layer = S4D(64, S4DConfig(state_size=8, dt_min=1e-3, dt_max=1e-1))
    dt = layer.log_dt.exp()
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1
    torch.testing.assert_close(layer.log_A_real.exp(), torch.full((64, 4), 0.5))
    torch.testing.assert_close(layer.A_imag[0], torch.pi * torch.arange(4.0))


def test_mamba_step_by_step_equals_the_parallel_forward():
    torch.manual_seed(0)
    mixer = Mamba(16, MambaConfig(state_size=4, conv_width=3))
    u = torch.randn(2, 21, 16)
    y_full, (conv_full, h_full) = mixer(u)
    state, ys = None, []
    for t in range(u.size(1)):
        y, state = mixer.step(u[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state[0], conv_full)
    torch.testing.assert_close(state[1], h_full, atol=1e-5, rtol=1e-4)


def test_mamba_forward_continues_from_a_state():
    torch.manual_seed(0)
    mixer = Mamba(16, MambaConfig(state_size=4))
    u = torch.randn(2, 30, 16)
    y_full, _ = mixer(u)
    y_head, state = mixer(u[:, :13])
    y_tail, _ = mixer(u[:, 13:], state)
    torch.testing.assert_close(torch.cat([y_head, y_tail], dim=1), y_full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_mamba_scans_agree(scan):
    torch.manual_seed(0)
    reference = Mamba(16, MambaConfig(scan="sequential"))
    mixer = Mamba(16, MambaConfig(scan=scan, chunk=5))
    mixer.load_state_dict(reference.state_dict())
    u = torch.randn(2, 26, 16)
    torch.testing.assert_close(mixer(u)[0], reference(u)[0], atol=1e-5, rtol=1e-4)


def ssm_models():
    return {"s4d": SSMGPT(gpt_config(), block=s4d_block(S4DConfig(state_size=8))),
            "mamba": SSMGPT(gpt_config(), block=mamba_block(MambaConfig(state_size=4)))}


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_recurrent_generation_equals_the_full_forward(name):
    torch.manual_seed(0)
    model = ssm_models()[name].eval()
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    prompt = model(idx[:, :7], cache=cache).logits  # the prompt in one call, then one token at a time
    steps = [model(idx[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(torch.cat([prompt, *steps], dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == 20


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_greedy_generation_is_the_same_with_and_without_the_recurrent_cache(name):
    torch.manual_seed(0)
    model = ssm_models()[name]
    prompt = torch.randint(0, 50, (1, 5))
    with_state = generate(model, prompt, 12, temperature=0, use_cache=True)
    without = generate(model, prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(with_state, without)


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_ssm_models_are_causal(name):
    torch.manual_seed(0)
    model = ssm_models()[name].eval()
    idx = torch.randint(0, 50, (1, 24))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (1, 14))
    before, after = model(idx).logits, model(changed).logits
    torch.testing.assert_close(before[:, :10], after[:, :10], atol=1e-5, rtol=0)
    assert (before[:, 10] - after[:, 10]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["s4d", "mamba"])
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = ssm_models()[name]
    idx = torch.randint(0, 50, (2, 16))
    model(idx, targets=idx).loss.backward()
    for param_name, p in model.named_parameters():
        if param_name == "position_embedding.weight":  # SSMs take no position embedding: frozen at zero
            assert not p.requires_grad and p.grad is None and not p.any()
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
        assert p.grad.abs().sum() > 0, param_name


def group_names(model, group):
    return {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if any(p is q for q in group["params"])}


@pytest.mark.parametrize("name, expected", [("mamba", {"A_log", "dt_bias"}),
                                            ("s4d", {"log_dt", "log_A_real", "A_imag"})])
def test_dynamics_parameters_get_their_own_optimizer_group(name, expected):
    model = ssm_models()[name]
    (group,) = ssm_param_groups(model, lr_scale=0.25)
    assert group_names(model, group) == expected and group["weight_decay"] == 0.0
    optimizer = make_optimizer(model, TrainConfig(device="cpu"), [group])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    assert optimizer.param_groups[-1]["lr_scale"] == 0.25 and optimizer.param_groups[-1]["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", [dict(state_size=3), dict(dt_min=0.2, dt_max=0.1), dict(kernel_chunk=0)])
def test_bad_s4d_config_raises(bad):
    with pytest.raises(ValueError, match="S4DConfig"):
        S4DConfig(**bad)


@pytest.mark.parametrize("bad", [dict(expand=0), dict(scan="blelloch"), dict(chunk=0), dict(dt_min=-1.0)])
def test_bad_mamba_config_raises(bad):
    with pytest.raises(ValueError, match="MambaConfig"):
        MambaConfig(**bad)


def test_padding_masks_are_refused():
    model = ssm_models()["mamba"]
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))


@STORE
def test_chunked_scan_passes_gradcheck(store_elements):
    inputs = [t.double().requires_grad_() for t in scan_inputs(batch=2, length=9, E=3, N=2)]
    scan = lambda *a: chunked_scan(*a, chunk=2, block_elements=2 * 3 * 2 * 4,  # blocks of 4, the last one padded
                                   store_elements=store_elements)
    assert torch.autograd.gradcheck(scan, inputs)


@STORE
def test_chunked_scan_gradient_through_the_last_state_only(store_elements):
    inputs = [t.double().requires_grad_() for t in scan_inputs(length=11)]
    grads = [torch.autograd.grad(scan(*inputs)[1].sum(), inputs, allow_unused=True, materialize_grads=True)
             for scan in (sequential_scan, lambda *a: chunked_scan(*a, chunk=3, block_elements=2 * 6 * 4 * 5,
                                                                   store_elements=store_elements))]
    for g_seq, g_chunk in zip(*grads):
        torch.testing.assert_close(g_chunk, g_seq)


def test_chunked_scan_second_backward_with_retain_graph_equals_the_first():
    inputs = [t.double().requires_grad_() for t in scan_inputs(length=19)]
    y, _ = chunked_scan(*inputs, block_elements=2 * 6 * 4 * 8)  # stored states: the second pass recomputes them
    first = torch.autograd.grad(y.sum(), inputs, retain_graph=True)
    second = torch.autograd.grad(y.sum(), inputs)
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g2, g1)


@pytest.mark.parametrize("bad", [dict(chunk=0), dict(block_elements=0), dict(store_elements=-1),
                                 dict(store_elements=True)])
def test_chunked_scan_refuses_bad_sizes(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        chunked_scan(*scan_inputs(length=5), **bad)


def test_mamba_causal_conv_equals_a_padded_conv1d():
    torch.manual_seed(0)
    mixer = Mamba(8, MambaConfig(conv_width=4))
    x_padded = torch.randn(2, 3 + 10, mixer.conv.in_channels)
    expected = mixer.conv(x_padded.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(mixer.causal_conv(x_padded), expected)


def test_ssm_gpt_keeps_mambas_selection_initialisation():
    torch.manual_seed(0)
    model = SSMGPT(gpt_config(d_model=64), block=mamba_block(MambaConfig(mimetic_init=True)))
    mixer = model.decoder.blocks[0].mixer
    R, N = mixer.dt_rank, mixer.config.state_size
    assert mixer.dt_proj.weight.abs().max() > 0.2  # uniform in ±R^-1/2, not GPT's std 0.02
    assert torch.equal(mixer.x_proj.weight[R + N:], mixer.x_proj.weight[R:R + N])  # mimetic: W_C = W_B
    torch.testing.assert_close(-mixer.A_log.exp(), torch.full_like(mixer.A_log, -torch.e ** -4))
    plain = Mamba(64, MambaConfig())
    torch.testing.assert_close(-plain.A_log.exp()[0], -torch.arange(1.0, 17.0))  # S4D-Real by default


def test_selective_copying_layout():
    from common.tasks import IGNORE, SelectiveCopying

    task = SelectiveCopying(length=40, n_tokens=5, n_symbols=6)
    x, y = task(8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 40)
    assert (x[:, 35:] == task.marker).all() and (y[:, :35] == IGNORE).all()
    for row_x, row_y in zip(x, y):
        data = row_x[:35][row_x[:35] != 0]
        assert torch.equal(data, row_y[35:])  # the data tokens, in order
        assert ((1 <= data) & (data <= 6)).all()


def test_mixed_lengths_draws_each_length_and_refuses_mixed_tasks():
    from common.tasks import InductionHeads, MixedLengths, SelectiveCopying

    mixed = MixedLengths(SelectiveCopying(n, 4, 6) for n in (16, 32, 64))
    assert mixed.lengths == [16, 32, 64] and mixed.vocab_size == 8 and mixed.chance == pytest.approx(1 / 6)
    generator = torch.Generator().manual_seed(0)
    seen = {mixed(3, generator)[0].shape for _ in range(40)}
    assert seen == {(3, 16), (3, 32), (3, 64)}
    first = [mixed(2, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0])  # the generator decides the length and the content
    with pytest.raises(ValueError, match="one task"):
        MixedLengths([SelectiveCopying(16, 4, 6), InductionHeads(16, 6)])
    with pytest.raises(ValueError, match="at least one"):
        MixedLengths([])


def test_induction_heads_layout():
    from common.tasks import IGNORE, InductionHeads

    task = InductionHeads(length=30, n_symbols=5)
    x, y = task(16, torch.Generator().manual_seed(0))
    assert (x[:, -1] == task.trigger).all() and (y[:, :-1] == IGNORE).all()
    for row_x, row_y in zip(x, y):
        first = (row_x[:-1] == task.trigger).nonzero()
        assert len(first) == 1 and row_y[-1] == row_x[first[0, 0] + 1]
