"""State-space sequence models: S4D (diagonal S4; Gu et al. 2022) and a simplified Mamba
(selective SSM; Gu & Dao 2023), as blocks that plug into ``common.model.GPT``.

    model = SSMGPT(gpt_config, block=mamba_block(MambaConfig()))   # or s4d_block(S4DConfig())

Dimension letters used in shapes:
    B batch, L sequence length, D model width,
    H channels of an S4D layer (= D), N state size per channel (S4D keeps N/2 complex
    conjugate pairs), E Mamba inner width (expand * D), R rank of Mamba's Δ projection,
    K width of Mamba's causal convolution, T chunk length and M number of chunks of the
    chunked scan (M * T >= L).

The mathematics, shared by both models. A continuous state space per channel,

    x'(t) = A x(t) + B u(t),      y(t) = C x(t) + D u(t),

is discretised with a step Δ by the zero-order hold (the input is constant over a step):

    Ā = exp(ΔA),    B̄ = (ΔA)^{-1} (exp(ΔA) - I) ΔB    ( = (exp(ΔA) - 1) / A * B for diagonal A ),

which gives a linear recurrence (the *recurrent view*, O(1) per step, for generation)

    x_k = Ā x_{k-1} + B̄ u_k,      y_k = C x_k + D u_k,

and, unrolled from x_{-1} = 0, a causal convolution (the *convolutional view*, for training)

    y = K * u + D u,      K_l = C Ā^l B̄   (l = 0 … L-1).

S4D: A, B, C, Δ do not depend on the input, so K is computed once per forward pass and the
convolution runs as an FFT in O(L log L). Mamba: Δ, B, C depend on the input (selection),
so there is no fixed kernel; the recurrence runs as a *scan*, here a chunked parallel scan.

Where this departs from the official code: S4D uses B = 1 (folded into C, as in the
minimal ``s4d.py``), no bidirectional or multi-kernel options, and computes the Vandermonde
product in chunks of positions to bound memory. Mamba discretises A with ZOH and B with
Euler (B̄ = ΔB), as the official implementation does; its scan is pure PyTorch (no fused
kernel), without recomputation in the backward pass; there is no residual in fp32 and no
RMSNorm (the blocks keep the project's pre-norm LayerNorm so everything else stays equal).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.model import GPT, FeedForward, GPTConfig
from common.train import no_weight_decay

# Parameters that set the dynamics (A and Δ): their own optimizer group (smaller lr, no decay).
SSM_DYNAMICS_PARAMETERS = ("log_dt", "log_A_real", "A_imag", "A_log", "dt_bias")


def _check_dt_range(owner: str, dt_min: float, dt_max: float) -> None:
    if not 0 < dt_min < dt_max:
        raise ValueError(f"{owner}.dt_min and dt_max must satisfy 0 < dt_min < dt_max, got {dt_min}, {dt_max}")


def log_uniform(size: int | tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """Samples with log-uniform distribution in [low, high] (Δ's initialisation)."""
    return torch.exp(torch.rand(size) * (math.log(high) - math.log(low)) + math.log(low))


# ---------------------------------------------------------------------------------------
# S4D


@dataclass
class S4DConfig:
    """Settings of an S4D layer. Every field is checked on creation."""

    state_size: int = 64  # N (N/2 complex pairs are stored)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    kernel_chunk: int = 256  # positions of the Vandermonde product computed at once

    def __post_init__(self):
        if not isinstance(self.state_size, int) or self.state_size < 2 or self.state_size % 2:
            raise ValueError(f"S4DConfig.state_size must be an even integer >= 2, got {self.state_size!r}")
        _check_dt_range("S4DConfig", self.dt_min, self.dt_max)
        if not isinstance(self.kernel_chunk, int) or self.kernel_chunk < 1:
            raise ValueError(f"S4DConfig.kernel_chunk must be a positive integer, got {self.kernel_chunk!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class S4D(nn.Module):
    """Diagonal SSM per channel, S4D-Lin initialisation: (B, L, H) -> (B, L, H).

    Parameters: Δ = exp(log_dt) (H,) log-uniform in [dt_min, dt_max]; A = -exp(log_A_real)
    + iπn (H, N/2); C (H, N/2) complex, standard normal; D (H,) skip. B is fixed to 1.
    Training uses the convolutional view (``forward``), generation the recurrent view
    (``step``); both compute the same outputs.
    """

    def __init__(self, channels: int, config: S4DConfig):
        super().__init__()
        self.config = config
        half = config.state_size // 2
        self.log_dt = nn.Parameter(log_uniform(channels, config.dt_min, config.dt_max).log())  # (H,)
        self.log_A_real = nn.Parameter(torch.full((channels, half), math.log(0.5)))  # Re A = -1/2
        self.A_imag = nn.Parameter(math.pi * torch.arange(half).float().repeat(channels, 1))  # Im A = πn
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, half, dtype=torch.cfloat)))  # (H, N/2, 2)
        self.D = nn.Parameter(torch.ones(channels))
        no_weight_decay(self.log_A_real, self.A_imag)  # the state matrix A: dynamics, not weights

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH: ΔA (so Ā = exp(ΔA)), B̄ = (exp(ΔA) - 1) / A (B = 1), and C; each (H, N/2) complex."""
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag  # (H, N/2)
        dtA = A * torch.exp(self.log_dt)[:, None]  # ΔA
        return dtA, (torch.exp(dtA) - 1.0) / A, torch.view_as_complex(self.C)

    def kernel(self, length: int) -> torch.Tensor:
        """K_l = C Ā^l B̄, summed over the conjugate pairs: (H, L) real.

        The Vandermonde product is split as Ā^(s+j) = Ā^s Ā^j, s a multiple of ``kernel_chunk``
        and j < ``kernel_chunk``: one exp per (channel, state, j), then a batched matmul.
        Memory stays O(H N chunk + H L) instead of O(H N L).
        """
        dtA, B_bar, C = self.discretise()  # (H, N/2) each
        chunk = min(length, self.config.kernel_chunk)
        within = torch.exp(dtA[..., None] * torch.arange(chunk, device=dtA.device))  # Ā^j, (H, N/2, chunk)
        starts = torch.arange(0, length, chunk, device=dtA.device)
        coefficients = (C * B_bar)[..., None] * torch.exp(dtA[..., None] * starts)  # C B̄ Ā^s, (H, N/2, S)
        K = torch.einsum("hns,hnj->hsj", coefficients, within)  # C B̄ Ā^(s+j), (H, S, chunk)
        return 2 * K.real.flatten(1)[:, :length]  # 2 Re(.): the conjugate half of the spectrum

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, L, H) -> y (B, L, H): y = K * u + D u with an FFT of size 2L (no wrap-around)."""
        length = u.size(1)
        k = self.kernel(length)  # (H, L), in the parameters' precision
        # The FFT runs in float32 at least (no half-precision FFT on most devices), in float64 for a float64 input.
        dtype = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
        u_f = torch.fft.rfft(u.transpose(1, 2).to(dtype), n=2 * length)  # (B, H, L+1)
        k_f = torch.fft.rfft(k.to(dtype), n=2 * length)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]  # causal linear convolution
        return (y.transpose(1, 2) + u.to(dtype) * self.D).to(u.dtype)

    def step(self, u: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: u (B, H), state (B, H, N/2) complex or None (zeros) -> y (B, H), new state."""
        dtA, B_bar, C = self.discretise()
        if state is None:
            state = torch.zeros(u.size(0), *dtA.shape, dtype=dtA.dtype, device=u.device)
        state = torch.exp(dtA) * state + B_bar * u[..., None]  # x_k = Ā x_{k-1} + B̄ u_k
        y = 2 * (C * state).sum(-1).real + self.D * u  # y_k = 2 Re(C x_k) + D u_k
        return y, state


class S4DLayer(nn.Module):
    """The S4D mixer of a block: SSM, GELU, then Linear(H, 2H) + GLU (as in ``s4d.py``): (B, L, D) -> (B, L, D)."""

    def __init__(self, d_model: int, config: S4DConfig, dropout: float = 0.0):
        super().__init__()
        self.ssm = S4D(d_model, config)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d_model, 2 * d_model)

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """Position-wise part after the SSM: (…, D) -> (…, D)."""
        return F.glu(self.output(self.dropout(F.gelu(y))), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.ssm(x))

    def step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) -> (B, D) and the new state (B, D, N/2)."""
        y, state = self.ssm.step(x, state)
        return self.mix(y), state


# ---------------------------------------------------------------------------------------
# selective scan (Mamba's SSM)


def scan_step(h: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
              B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the selective SSM for any leading dims (…):

    h (…, E, N), x and delta (…, E), A (E, N), B and C (…, N) -> y (…, E), new h (…, E, N).
    """
    A_bar = torch.exp(delta[..., None] * A)  # Ā_t = exp(Δ_t A)      (ZOH)
    h = A_bar * h + (delta * x)[..., None] * B[..., None, :]  # h_t = Ā_t h_{t-1} + Δ_t B_t x_t   (Euler for B)
    y = torch.einsum("...en,...n->...e", h, C)  # y_t = C_t · h_t
    return y, h


def _zero_state(x: torch.Tensor, A: torch.Tensor, leading: tuple[int, ...]) -> torch.Tensor:
    return x.new_zeros(*leading, *A.shape)


def sequential_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one ``scan_step`` per position.

    x, delta (B, L, E); A (E, N); B, C (B, L, N); h0 (B, E, N) or None -> y (B, L, E), h_L (B, E, N).
    """
    h = _zero_state(x, A, (x.size(0),)) if h0 is None else h0
    ys = []
    for t in range(x.size(1)):
        y, h = scan_step(h, x[:, t], delta[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


def chunked_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 h0: torch.Tensor | None = None, chunk: int | None = None, block_elements: int = 2**19,
                 store_elements: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel scan with a hand-written backward pass; same contract as ``sequential_scan``.

    The sequence is processed in blocks of G positions, G chosen so that a (B, G, N, E) tensor holds
    at most ``block_elements`` numbers, unless one chunk of T positions alone holds more (then G = T):
    the block's tensors stay in the CPU's caches, and memory is O(max(block_elements, B T N E) + B L E).
    The state is carried from block to block. Inside a block (``_linear_scan``) every position runs in
    parallel except ~3√G short steps.

    When a gradient is needed and the states of the whole sequence hold at most ``store_elements``
    numbers (B L N E; short training sequences), the forward pass keeps them and Ā for the backward
    pass. Otherwise (long sequences) the backward pass recomputes each block's states from the state
    that entered it, so memory stays O(B L E) instead of O(B L E N), as the official CUDA kernel does.
    Either way it then runs the adjoint recurrence backwards.
    """
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    for name, value, low in (("block_elements", block_elements, 1), ("store_elements", store_elements, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if h0 is None:
        h0 = _zero_state(x, A, (x.size(0),))
    inputs = (x, delta, A, B, C, h0)
    store = (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
             and x.size(0) * x.size(1) * A.numel() <= store_elements)
    return _SelectiveScan.apply(*inputs, chunk, block_elements, store)


def _linear_scan(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor, T: int, decay: torch.Tensor,
                 reverse: bool = False) -> torch.Tensor:
    """Solves s_t = a_t ⊙ s_{t-1} + u_t in place (u becomes the states s), from s_{-1} = h.

    a, u (G, B, N, E), time first, with G a multiple of T = G / M; h (B, N, E); ``decay`` (M, B, N, E)
    each chunk's product Π_t a_t (for Ā = exp(ΔA): exp(A Σ_t Δ_t), M exps per T positions). Returns
    the last state.
    With ``reverse`` the recurrence runs from the end, s_t = a_t ⊙ s_{t+1} + u_t from s_G = h (the
    adjoint of the forward recurrence). The G positions form M chunks of T, in three passes:

    1. every chunk at once, from a zero state: T short steps give each chunk's local end state;
    2. across chunks: the state entering chunk m is H_m = P_{m-1} ⊙ H_{m-1} + (local end of m-1),
       with P = Π_t a_t the chunk's decay (M short steps);
    3. every chunk at once again, now from its true entering state, in place (T short steps).
    """
    M = u.size(0) // T
    a_t, u_t = a.view(M, T, *a.shape[1:]).unbind(1), u.view(M, T, *u.shape[1:]).unbind(1)  # T views (M, B, N, E)
    order = list(range(T - 1, -1, -1) if reverse else range(T))
    local = u_t[order[0]].clone()  # pass 1: each chunk's local end state, from zero
    for t in order[1:]:
        local = torch.addcmul(u_t[t], a_t[t], local)
    entering = torch.empty_like(local)
    for m in (range(M - 1, -1, -1) if reverse else range(M)):  # pass 2: carry across chunks
        entering[m] = h
        h = torch.addcmul(local[m], decay[m], h)
    u_t[order[0]].addcmul_(a_t[order[0]], entering)  # pass 3: s_t = a_t s_{t∓1} + u_t, in place
    for previous, t in zip(order, order[1:]):
        u_t[t].addcmul_(a_t[t], u_t[previous])
    return h


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t · h_t, h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t, block by block. Inside a block the
    states are (G, B, N, E) tensors: time first (a shifted view stays contiguous), E innermost (the
    read-out C_t · h_t is one batched (1, N) @ (N, E) product)."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, chunk, block_elements, store):
        batch, length, E = x.shape
        N = A.size(1)
        group = max(1, min(length, block_elements // (batch * N * E)))
        T = chunk or math.ceil(math.sqrt(group))
        group = max(T, group // T * T)  # a whole number of chunks
        At = A.t().contiguous()  # (N, E)
        h = h0.transpose(1, 2).contiguous()  # (B, N, E)
        y = x.new_empty(batch, length, E)
        a_buffer, u_buffer = x.new_empty(group, batch, N, E), x.new_empty(group, batch, N, E)
        entering, kept = [], []
        for start in range(0, length, group):
            entering.append(h)
            d, dx, b, c, keep = _block_inputs(x, delta, B, C, start, group, T)
            G = d.size(0)
            a, u = (x.new_empty(G, batch, N, E), x.new_empty(G, batch, N, E)) if store else (a_buffer[:G], u_buffer[:G])
            torch.mul(d[:, :, None, :], At, out=a).exp_()  # Ā_t = exp(Δ_t A)  (ZOH)
            torch.mul(dx[:, :, None, :], b[..., None], out=u)  # u_t = Δ_t B_t x_t  (Euler for B)
            h = _linear_scan(a, u, h, T, _chunk_decay(d, At, T))  # u now holds the states h_t
            out = torch.bmm(c.view(-1, 1, N), u.view(-1, N, E))  # y_t = C_t · h_t, (G B, 1, E)
            y[:, start:start + keep] = out.view(G, batch, E)[:keep].transpose(0, 1)
            if store:
                kept.append((a, u))
        ctx.save_for_backward(x, delta, A, B, C, torch.stack(entering))
        ctx.sizes, ctx.kept = (group, T), kept  # kept: each block's Ā and states h_t, or [] (recompute)
        return y, h.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        x, delta, A, B, C, entering = ctx.saved_tensors
        (group, T), kept = ctx.sizes, ctx.kept
        ctx.kept = []  # freed now; a second backward (retain_graph) recomputes
        batch, length, E = x.shape
        N = A.size(1)
        At = A.t().contiguous()
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y
        # ∂loss/∂(the state after the current block), (B, N, E)
        carry = torch.zeros_like(entering[0]) if grad_h is None else grad_h.transpose(1, 2).contiguous()
        grads = {name: torch.zeros_like(t) for name, t in (("x", x), ("delta", delta), ("B", B), ("C", C))}
        grad_At = torch.zeros_like(At)
        starts = list(range(0, length, group))
        for index in range(len(starts) - 1, -1, -1):
            start = starts[index]
            d, dx, b, c, keep = _block_inputs(x, delta, B, C, start, group, T)
            G = d.size(0)
            gy = _time_first(grad_y, start, keep, G)  # (G, B, E)
            decay = _chunk_decay(d, At, T)
            if kept:  # Ā_t and the states h_0 … h_{G-1} of the forward pass
                a, states = kept[index]
            else:  # recomputed from the state entering the block
                a = torch.mul(d[:, :, None, :], At).exp_()
                states = torch.mul(dx[:, :, None, :], b[..., None])
                _linear_scan(a, states, entering[index], T, decay)
            # The adjoint λ_t = ∂loss/∂h_t = g_t + Ā_{t+1} λ_{t+1}, g_t = C_t ⊗ ∂loss/∂y_t. With μ_t = Ā_t ⊙ λ_t
            # (∂loss/∂h_{t-1} through step t): μ_t = Ā_t ⊙ μ_{t+1} + Ā_t ⊙ g_t, a reverse scan.
            # mu[0 … G-1] = μ_0 … μ_{G-1}; mu[G] = μ_G, the carry from the next block.
            mu = x.new_empty(G + 1, batch, N, E)
            mu[G] = carry
            torch.mul(gy[:, :, None, :], c[..., None], out=mu[:G]).mul_(a)
            carry = _linear_scan(a, mu[:G], carry, T, decay, reverse=True)  # μ_0 = ∂loss/∂(state entering)
            later = mu[1:].view(-1, N, E)  # μ_{t+1}: λ_t = g_t + μ_{t+1}
            # ∂loss/∂u_t = λ_t, contracted with B_t over n and with Δ_t x_t over e
            lam_B = (torch.bmm(b.view(-1, 1, N), later).view(G, batch, E)
                     + (c * b).sum(-1, keepdim=True) * gy)
            lam_dx = (torch.linalg.vecdot(later.view(G, batch, N, E), dx[:, :, None, :])
                      + c * (gy * dx).sum(-1, keepdim=True))
            z = mu[:G]  # ∂loss/∂(Δ_t A) = λ_t ⊙ Ā_t ⊙ h_{t-1} = μ_t ⊙ h_{t-1}
            z[0].mul_(entering[index])
            z[1:].mul_(states[:-1])
            grad_x = lam_B * d  # ∂u_t/∂x_t = Δ_t B_t
            grad_d = lam_B.mul_(_time_first(x, start, keep, G))  # through u_t = Δ_t x_t B_t ...
            grad_d += torch.linalg.vecdot(z, At, dim=2)  # ... and through Δ_t A: Σ_n z_n A_n
            grad_At += z.mul_(d[:, :, None, :]).sum((0, 1))  # Σ_t z_t Δ_t
            grad_C = torch.linalg.vecdot(states, gy[:, :, None, :])  # Σ_e h_t gy_t, (G, B, N)
            span = slice(start, start + keep)
            grads["delta"][:, span] = grad_d[:keep].transpose(0, 1)
            grads["x"][:, span] = grad_x[:keep].transpose(0, 1)
            grads["B"][:, span] = lam_dx[:keep].transpose(0, 1)
            grads["C"][:, span] = grad_C[:keep].transpose(0, 1)
        return (grads["x"], grads["delta"], grad_At.t(), grads["B"], grads["C"],
                carry.transpose(1, 2), None, None, None)


def _chunk_decay(d: torch.Tensor, At: torch.Tensor, T: int) -> torch.Tensor:
    """Each chunk's decay Π_t Ā_t = exp(A Σ_t Δ_t): d (G, B, E), At (N, E) -> (G / T, B, N, E)."""
    return torch.exp(d.view(-1, T, *d.shape[1:]).sum(1)[:, :, None, :] * At)


def _time_first(t: torch.Tensor, start: int, keep: int, length: int) -> torch.Tensor:
    """Positions start … start+keep-1 of t (B, L, …) as (length, B, …), zero-padded after ``keep``."""
    part = t[:, start:start + keep].transpose(0, 1)
    if keep < length:
        part = F.pad(part, (0, 0) * (t.dim() - 2) + (0, 0, 0, length - keep))
    return part.contiguous()


def _block_inputs(x, delta, B, C, start, group, T):
    """A block's Δ, Δ ⊙ x, B and C, time first (G, B, …), zero-padded to a multiple G of T (Δ = 0 there:
    Ā = 1 and u = 0, so the state passes through unchanged), and the number of real positions."""
    keep = min(group, x.size(1) - start)
    G = math.ceil(keep / T) * T
    d = _time_first(delta, start, keep, G)
    return d, d * _time_first(x, start, keep, G), _time_first(B, start, keep, G), _time_first(C, start, keep, G), keep


SCANS = ("chunked", "sequential")


# ---------------------------------------------------------------------------------------
# Mamba


@dataclass
class MambaConfig:
    """Settings of a simplified Mamba mixer. Every field is checked on creation."""

    expand: int = 2  # E = expand * D
    state_size: int = 16  # N
    conv_width: int = 4  # K
    dt_rank: int | None = None  # R; default ceil(D / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    scan: str = "chunked"  # "chunked" (parallel) | "sequential" (reference)
    chunk: int | None = None  # T of the chunked scan; default ceil(sqrt(G)), G the block length
    mimetic_init: bool = False  # W_C = W_B and A ≈ 0 at initialisation (Trockman et al. 2024)

    def __post_init__(self):
        for name in ("expand", "state_size", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {value!r}")
        for name in ("dt_rank", "chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MambaConfig.{name} must be a positive integer or None, got {value!r}")
        _check_dt_range("MambaConfig", self.dt_min, self.dt_max)
        if self.scan not in SCANS:
            raise ValueError(f"MambaConfig.scan must be one of {SCANS}, got {self.scan!r}")
        if not isinstance(self.mimetic_init, bool):
            raise ValueError(f"MambaConfig.mimetic_init must be True or False, got {self.mimetic_init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


MambaState = tuple[torch.Tensor, torch.Tensor]  # last K-1 conv inputs (B, K-1, E), SSM state h (B, E, N)


class Mamba(nn.Module):
    """Simplified Mamba mixer: (B, L, D) -> (B, L, D).

        x, z = split(W_in u)                    two branches of width E
        x = SiLU(causal depthwise conv_K(x))    short local mixing
        Δ, B, C = softplus(W_Δ W_r x + b_Δ), W_B x, W_C x     input-dependent (selection)
        y = SSM_{Δ, A, B, C}(x) + D x           selective scan
        out = W_out (y ⊙ SiLU(z))               gating
    """

    def __init__(self, d_model: int, config: MambaConfig):
        super().__init__()
        self.config = config
        E, N, K = config.expand * d_model, config.state_size, config.conv_width
        self.dt_rank = config.dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv = nn.Conv1d(E, E, K, groups=E)  # depthwise; made causal by left padding
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)  # x -> (Δ low-rank, B, C)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=False)
        dt = log_uniform(E, config.dt_min, config.dt_max)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}: softplus(b_Δ) = Δ_init
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(E, 1))  # A = -(1 … N), S4D-Real
        self.D = nn.Parameter(torch.ones(E))
        no_weight_decay(self.A_log)  # the state matrix A: dynamics, not weights
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.reset_selection()

    def reset_selection(self) -> None:
        """Mamba's initialisation of the selection path x -> Δ: W_r (x_proj) PyTorch's default, W_Δ
        (dt_proj) uniform in ±R^(-1/2). With both at a small std (0.02, a GPT's default for every
        Linear) Δ barely depends on the input and the product of two small weights barely learns.

        With ``mimetic_init`` (Trockman et al. 2024, "Mimetic initialization helps state space models
        learn to recall"): W_C = W_B, so C_t · B_s = x_t^T W_B^T W_B x_s starts like an attention
        score of a token with itself, and A = -e^{-4} ≈ -0.018 for every state, so Ā_t = exp(Δ_t A) ≈ 1:
        the state starts with a long memory instead of S4D-Real's A = -(1 … N)."""
        self.x_proj.reset_parameters()
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        if self.config.mimetic_init:
            R, N = self.dt_rank, self.config.state_size
            with torch.no_grad():
                self.x_proj.weight[R + N:] = self.x_proj.weight[R:R + N]  # W_C = W_B
                self.A_log.fill_(-4.0)  # A = -exp(A_log)

    def selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (…, E) -> Δ (…, E) > 0, B (…, N), C (…, N): the input-dependent SSM parameters."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.config.state_size, self.config.state_size], dim=-1)
        return F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_bias)), B, C  # Δ = softplus(W_Δ W_r x + b_Δ)

    def causal_conv(self, x_padded: torch.Tensor) -> torch.Tensor:
        """The depthwise causal convolution as K shifted multiply-adds: (B, K-1+L, E) -> (B, L, E).

        out_t = b + Σ_k w_k x_{t-K+1+k}; K passes over (B, L, E), cheaper on a CPU than Conv1d's
        transposes to (B, E, L) and back."""
        K, length = self.config.conv_width, x_padded.size(1) - self.config.conv_width + 1
        w = self.conv.weight[:, 0]  # (E, K)
        out = torch.addcmul(self.conv.bias, x_padded[:, K - 1:], w[:, K - 1])
        for k in range(K - 1):
            out.addcmul_(x_padded[:, k:k + length], w[:, k])
        return out

    def forward(self, u: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        """u (B, L, D) and the state after earlier positions (or None) -> (B, L, D) and the new state."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, E) each
        K = self.config.conv_width
        history = x.new_zeros(x.size(0), K - 1, x.size(2)) if state is None else state[0]
        x_padded = torch.cat([history, x], dim=1)  # (B, K-1+L, E): position t sees t-K+1 … t
        x = F.silu(self.causal_conv(x_padded))  # (B, L, E)
        delta, B, C = self.selection(x)
        A = -torch.exp(self.A_log)  # (E, N), negative real: a decaying state
        h0 = None if state is None else state[1]
        if self.config.scan == "chunked":
            y, h = chunked_scan(x, delta, A, B, C, h0, self.config.chunk)
        else:
            y, h = sequential_scan(x, delta, A, B, C, h0)
        y = torch.addcmul(y, x, self.D) * F.silu(z)  # skip D x, then the gate SiLU(z)
        return self.out_proj(y), (x_padded[:, x_padded.size(1) - (K - 1):], h)

    def step(self, u: torch.Tensor, state: MambaState | None) -> tuple[torch.Tensor, MambaState]:
        """One position in O(1) time and memory: u (B, D) -> (B, D) and the new state."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, E)
        if state is None:
            E, N, K = x.size(-1), self.config.state_size, self.config.conv_width
            state = (x.new_zeros(x.size(0), K - 1, E), x.new_zeros(x.size(0), E, N))
        window = torch.cat([state[0], x[:, None]], dim=1)  # (B, K, E)
        x = F.silu(self.causal_conv(window))[:, 0]  # the conv at one position: (B, E)
        delta, B, C = self.selection(x)
        y, h = scan_step(state[1], x, delta, -torch.exp(self.A_log), B, C)
        y = torch.addcmul(y, x, self.D) * F.silu(z)
        return self.out_proj(y), (window[:, 1:], h)


# ---------------------------------------------------------------------------------------
# blocks for common.model.GPT, and the recurrent cache


class SSMCache:
    """Per-layer recurrent states for incremental decoding; ``GPT`` reads ``length``.

    Unlike a KV cache, each layer's state has a fixed size whatever the context.
    """

    def __init__(self, n_layers: int):
        self.states: list = [None] * n_layers
        self.lengths = [0] * n_layers

    @property
    def length(self) -> int:
        return self.lengths[0]

    def state_bytes(self) -> int:
        tensors = [t for s in self.states if s is not None for t in (s if isinstance(s, tuple) else (s,))]
        return sum(t.numel() * t.element_size() for t in tensors)


def _no_padding(key_padding_mask: torch.Tensor | None) -> None:
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask must be None for SSM blocks: a scan has no keys to mask "
                         "(right-pad the batch instead; a causal scan never sees the padding)")


class S4DBlock(nn.Module):
    """Attention replaced by an S4D layer, FFN kept: x + S4D(LN(x)), then x + FFN(LN(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, config: GPTConfig, layer_index: int, s4d: S4DConfig):
        super().__init__()
        self.layer_index = layer_index
        self.norm1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mixer = S4DLayer(config.d_model, s4d, config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.feed_forward = FeedForward(config.d_model, config.d_ff, config.dropout, config.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: SSMCache | None = None) -> torch.Tensor:
        """Without a cache: the convolutional view. With one: the recurrent view, position by position."""
        _no_padding(key_padding_mask)
        if cache is None:
            x = x + self.mixer(self.norm1(x))
        else:
            state, mixed = cache.states[self.layer_index], []
            for t in range(x.size(1)):
                y, state = self.mixer.step(self.norm1(x[:, t]), state)
                mixed.append(y)
            cache.states[self.layer_index] = state
            cache.lengths[self.layer_index] += x.size(1)
            x = x + torch.stack(mixed, dim=1)
        return x + self.feed_forward(self.norm2(x))


class MambaBlock(nn.Module):
    """Attention and FFN replaced by one Mamba mixer: x + Mamba(LN(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, config: GPTConfig, layer_index: int, mamba: MambaConfig):
        super().__init__()
        self.layer_index = layer_index
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mixer = Mamba(config.d_model, mamba)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cache: SSMCache | None = None) -> torch.Tensor:
        """Without a cache: the parallel scan. With one: continue from the cached state
        (one new position: the O(1) ``step``; several: the scan from that state)."""
        _no_padding(key_padding_mask)
        if cache is None:
            return x + self.dropout(self.mixer(self.norm(x))[0])
        state = cache.states[self.layer_index]
        if x.size(1) == 1:
            y, state = self.mixer.step(self.norm(x[:, 0]), state)
            y = y[:, None]
        else:
            y, state = self.mixer(self.norm(x), state)
        cache.states[self.layer_index] = state
        cache.lengths[self.layer_index] += x.size(1)
        return x + self.dropout(y)


def s4d_block(s4d: S4DConfig):
    """A ``block=`` factory for ``GPT``: every layer an ``S4DBlock``."""
    return lambda config, layer_index: S4DBlock(config, layer_index, s4d)


def mamba_block(mamba: MambaConfig):
    """A ``block=`` factory for ``GPT``: every layer a ``MambaBlock``."""
    return lambda config, layer_index: MambaBlock(config, layer_index, mamba)


class SSMGPT(GPT):
    """``common.model.GPT`` with SSM blocks; only the cache differs, so ``common.generate`` works.

    No position embedding: a recurrence knows the order of its inputs, and a learned table would stop
    it at ``context_length`` (untrained rows beyond the training length). The table stays (zero, frozen)
    so the GPT code is unchanged. GPT's initialisation (every Linear at std 0.02) is kept, except
    Mamba's selection path, which gets its own back (``Mamba.reset_selection``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.zeros_(self.position_embedding.weight)
        self.position_embedding.weight.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, Mamba):
                module.reset_selection()

    def new_cache(self, max_length: int | None = None) -> SSMCache:
        return SSMCache(self.config.n_layers)


def ssm_param_groups(model: nn.Module, lr_scale: float = 1.0) -> list[dict]:
    """The dynamics parameters (A and Δ) in their own group for ``common.train.train``:
    lr multiplied by ``lr_scale``, no weight decay (S4's recipe)."""
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale!r}")
    params = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in SSM_DYNAMICS_PARAMETERS]
    return [{"params": params, "lr_scale": lr_scale, "weight_decay": 0.0}] if params else []
