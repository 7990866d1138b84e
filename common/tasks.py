"""Synthetic sequence tasks: small problems where a mechanism is needed by construction.

A task is a function ``sample(batch_size, generator) -> (inputs, targets)``: ``inputs`` (B, L) token
ids, ``targets`` (B, L) the token each position must predict, or ``IGNORE`` where nothing is scored.
A language model (any module returning ``.logits`` (B, L, V), like ``common.model.GPT``) trains on
the scored positions only and is measured by its accuracy there.

    batches = task_batches(sample)                       # a ``batches`` function for common.train
    train(model, batches, config, loss_fn=masked_loss)
    test = fixed_batches(sample, n_batches=8, batch_size=64, seed=1)   # the same held-out set every run
    masked_accuracy(model, test)                          # {"accuracy", "correct", "total", ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a target nobody scores (cross_entropy's ignore_index)

Sample = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def task_batches(sample: Sample, batch_size: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """A ``batches(generator)`` function for ``common.train.train``: a fresh batch of the task per step."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return lambda generator: sample(batch_size, generator)


def fixed_batches(sample: Sample, n_batches: int, batch_size: int,
                  seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches drawn with their own seed: a held-out set that is the same in every run."""
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return [sample(batch_size, generator) for _ in range(n_batches)]


def masked_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the scored positions (targets != IGNORE), plus any auxiliary loss the model reports."""
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
    aux = getattr(out, "aux_loss", None)
    return loss if aux is None else loss + aux


@torch.no_grad()
def scored_predictions(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions and targets at the scored positions of one batch: two (N,) tensors."""
    x, y = batch
    device = next(model.parameters()).device
    logits = model(x.to(device)).logits
    y = y.to(device)
    scored = y != IGNORE
    return logits.argmax(-1)[scored].cpu(), y[scored].cpu()


@torch.no_grad()
def masked_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Accuracy at the scored positions, and the share of sequences with every scored position right.

    Returns ``accuracy``, ``correct``, ``total``, ``sequence_accuracy`` and ``per_item`` (a list of 0/1
    per scored position, in order, for paired tests between models on the same items).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_item, sequences_right, sequences = [], 0, 0
    for x, y in batches:
        logits = model(x.to(device)).logits
        y = y.to(device)
        scored = y != IGNORE
        right = (logits.argmax(-1) == y) & scored
        per_item.append(right[scored].cpu())
        has_scored = scored.any(dim=1)
        sequences_right += int(((right.sum(1) == scored.sum(1)) & has_scored).sum())
        sequences += int(has_scored.sum())
    model.train(was_training)
    items = torch.cat(per_item) if per_item else torch.zeros(0, dtype=torch.bool)
    total = int(items.numel())
    if total == 0:
        raise ValueError("no scored positions in the batches (every target is IGNORE)")
    return {"accuracy": items.float().mean().item(), "correct": int(items.sum()), "total": total,
            "sequence_accuracy": sequences_right / max(sequences, 1), "per_item": items.int().tolist()}


def distance_recall(length: int, distances: Iterable[int], n_values: int = 16, n_noise: int = 32) -> Sample:
    """Recall the one value token planted d positions before the last position (a query token).

    Tokens: 0 the query, 1 .. ``n_values`` the values, then ``n_noise`` noise tokens that fill the
    rest. Each sequence draws d uniformly from ``distances`` (each in [1, length - 1]) and a value;
    only the last position is scored (target: the value). Chance is 1 / ``n_values``. A model whose
    last position cannot see position length - 1 - d (a stack of sliding windows, say) cannot do
    better than chance at that d.
    """
    distances = torch.as_tensor(list(distances), dtype=torch.long)
    if distances.numel() == 0 or int(distances.min()) < 1 or int(distances.max()) > length - 1:
        raise ValueError(f"distances must be non-empty and lie in [1, length - 1 = {length - 1}], "
                         f"got {distances.tolist()}")
    if n_values < 2 or n_noise < 1:
        raise ValueError(f"need n_values >= 2 and n_noise >= 1, got {n_values}, {n_noise}")

    def sample(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(1 + n_values, 1 + n_values + n_noise, (batch_size, length), generator=generator)
        value = torch.randint(1, 1 + n_values, (batch_size,), generator=generator)
        d = distances[torch.randint(0, len(distances), (batch_size,), generator=generator)]
        x[torch.arange(batch_size), length - 1 - d] = value
        x[:, -1] = 0  # the query
        y = torch.full_like(x, IGNORE)
        y[:, -1] = value
        return x, y

    return sample


class KeyedRecall:
    """Recall from a table whose keys carry exactly ``key_bits`` dimensions (the low-rank task of notebook 05).

    A sequence holds ``n_pairs`` table tokens, each a (key, value) pair with a distinct random key
    among the 2^k sign codes of k = ``key_bits`` bits and a random value among ``n_values``, then
    ``n_queries`` query tokens, each naming one key of the table; the target at a query is its value.

    ``embedding(d_model)`` is the fixed input table that makes the key k-dimensional by construction:
    a table token is [key code | value one-hot | 0], a query [0 | 0 | key code], where a key code
    writes bit b as (+1, -1) or (-1, +1) (every token then has the same sum and norm, so a LayerNorm
    acts on all of them alike). Frozen, with no position embedding, it leaves a one-layer model
    nothing but the bilinear score q·k to find the key: an attention whose W_Q, W_K have rank r < k
    sees only r directions of the key space, and keys that agree on those collide.

    Vocabulary: [0, V) answers (value v), then 2^k·V table tokens (key, value), then 2^k queries.
    """

    def __init__(self, key_bits: int = 6, n_pairs: int = 32, n_values: int = 8, n_queries: int = 16):
        for name, value, low in [("key_bits", key_bits, 1), ("n_pairs", n_pairs, 1), ("n_values", n_values, 2),
                                 ("n_queries", n_queries, 1)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if key_bits > 16 or n_pairs > 2 ** key_bits or n_queries > n_pairs:
            raise ValueError(f"need key_bits <= 16, n_pairs <= 2^key_bits = {2 ** min(key_bits, 16)} and "
                             f"n_queries <= n_pairs, got {key_bits}, {n_pairs}, {n_queries}")
        self.key_bits, self.n_pairs, self.n_values, self.n_queries = key_bits, n_pairs, n_values, n_queries
        self.n_keys = 2 ** key_bits
        self.pair_offset = n_values
        self.query_offset = n_values + self.n_keys * n_values
        self.vocab_size = self.query_offset + self.n_keys
        self.length = n_pairs + n_queries
        self.code_width = 4 * key_bits + n_values  # key code (2k) + value one-hot (V) + query code (2k)

    def key_codes(self) -> torch.Tensor:
        """(2^k, 2k) balanced sign codes: bit b of key i as (s, -s) with s = ±1."""
        bits = (torch.arange(self.n_keys)[:, None] >> torch.arange(self.key_bits - 1, -1, -1)) & 1
        signs = bits.float() * 2 - 1
        return torch.stack([signs, -signs], dim=-1).flatten(1)

    def embedding(self, d_model: int) -> torch.Tensor:
        """The fixed (vocab_size, d_model) input table; columns past ``code_width`` stay 0."""
        if d_model < self.code_width:
            raise ValueError(f"d_model must be >= 4·key_bits + n_values = {self.code_width}, got {d_model}")
        c, values = 2 * self.key_bits, self.n_values
        table = torch.zeros(self.vocab_size, d_model)
        table[:values, c:c + values] = torch.eye(values)
        codes = self.key_codes()
        key = torch.arange(self.n_keys).repeat_interleave(values)
        value = torch.arange(values).repeat(self.n_keys)
        rows = self.pair_offset + key * values + value
        table[rows, :c] = codes[key]
        table[rows, c + value] = 1.0
        table[self.query_offset:, c + values:2 * c + values] = codes
        return table

    def freeze_inputs(self, model: nn.Module) -> nn.Module:
        """Give a ``common.model.GPT`` the fixed table and no position embedding, both frozen."""
        with torch.no_grad():
            model.token_embedding.weight.copy_(self.embedding(model.token_embedding.weight.size(1)))
            model.position_embedding.weight.zero_()
        model.token_embedding.weight.requires_grad_(False)
        model.position_embedding.weight.requires_grad_(False)
        return model

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both (B, n_pairs + n_queries); targets IGNORE except at the queries."""
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, :self.n_pairs]
        values = torch.randint(0, self.n_values, (batch_size, self.n_pairs), generator=generator)
        asked = torch.rand(batch_size, self.n_pairs, generator=generator).argsort(-1)[:, :self.n_queries]
        inputs = torch.cat([self.pair_offset + keys * self.n_values + values,
                            self.query_offset + keys.gather(1, asked)], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, self.n_pairs:] = values.gather(1, asked)
        return inputs, targets

    def mixed_sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training sequences whose tables hold m distinct pairs (m uniform in [1, n_pairs]), each at least
        once, the slots filled by repeats in random order; queries ask among the m keys. Small tables make
        the value copy learnable before the key match is (with 32 distinct pairs alone, a one-layer model
        often stays at chance); ``sample`` (all pairs distinct) is the test. Shapes as ``sample``."""
        n = self.n_pairs
        keys = torch.rand(batch_size, self.n_keys, generator=generator).argsort(-1)[:, :n]
        values = torch.randint(0, self.n_values, (batch_size, n), generator=generator)
        m = torch.randint(1, n + 1, (batch_size, 1), generator=generator)
        slot = torch.arange(n).expand(batch_size, n)
        filler = (torch.rand(batch_size, n, generator=generator) * m).long()  # a random one of the m pairs
        pick = torch.where(slot < m, slot, filler).gather(1, torch.rand(batch_size, n, generator=generator).argsort(-1))
        asked = (torch.rand(batch_size, self.n_queries, generator=generator) * m).long()
        inputs = torch.cat([self.pair_offset + keys.gather(1, pick) * self.n_values + values.gather(1, pick),
                            self.query_offset + keys.gather(1, asked)], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, n:] = values.gather(1, asked)
        return inputs, targets

    def accuracy_seeing(self, bits: int, n_sequences: int = 4000, seed: int = 0) -> float:
        """Accuracy of the best guess from ``bits`` of the k key bits: the most common value among the
        table's keys that agree with the query on those bits (ties split). A reference for a rank-r reader."""
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= self.key_bits:
            raise ValueError(f"bits must be an integer in [0, {self.key_bits}], got {bits!r}")
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = self.sample(n_sequences, generator)
        keys = (inputs[:, :self.n_pairs] - self.pair_offset) // self.n_values
        values = (inputs[:, :self.n_pairs] - self.pair_offset) % self.n_values
        asked = inputs[:, self.n_pairs:] - self.query_offset
        shift = self.key_bits - bits
        agree = (keys[:, None, :] >> shift) == (asked[:, :, None] >> shift)  # (B, Q, P)
        votes = (agree[..., None] & (values[:, None, :, None] == torch.arange(self.n_values))).sum(2)  # (B, Q, V)
        best = votes == votes.max(-1, keepdim=True).values
        right = best.gather(-1, targets[:, self.n_pairs:, None]).squeeze(-1)
        return float((right / best.sum(-1)).mean())


class SelectiveCopying:
    """Selective copying (Gu & Dao 2023, section 4.1): ``n_tokens`` data tokens at random positions among
    noise, then ``n_tokens`` markers; at the i-th marker the target is the i-th data token.

    The gaps between data tokens change from sequence to sequence, so a time-invariant model (a fixed
    convolution kernel) cannot skip the noise; a model whose update depends on the token can.
    Vocabulary: 0 noise, 1 … ``n_symbols`` data tokens, ``n_symbols + 1`` the marker. ``length`` counts
    every position, markers included. Chance: 1 / ``n_symbols``.
    """

    def __init__(self, length: int = 256, n_tokens: int = 16, n_symbols: int = 16):
        for name, value, low in [("length", length, 2), ("n_tokens", n_tokens, 1), ("n_symbols", n_symbols, 2)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if length < 2 * n_tokens:
            raise ValueError(f"length must be >= 2 * n_tokens = {2 * n_tokens} (tokens, then markers), got {length}")
        self.length, self.n_tokens, self.n_symbols = length, n_tokens, n_symbols
        self.marker, self.vocab_size, self.chance = n_symbols + 1, n_symbols + 2, 1 / n_symbols

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, length); targets (B, length), IGNORE except at the markers."""
        span = self.length - self.n_tokens  # where the data tokens may sit
        positions = torch.rand(batch_size, span, generator=generator).argsort(-1)[:, :self.n_tokens].sort(-1).values
        tokens = torch.randint(1, self.n_symbols + 1, (batch_size, self.n_tokens), generator=generator)
        x = torch.zeros(batch_size, self.length, dtype=torch.long).scatter_(1, positions, tokens)
        x[:, span:] = self.marker
        y = torch.full_like(x, IGNORE)
        y[:, span:] = tokens
        return x, y


class InductionHeads:
    """Induction heads (Gu & Dao 2023, section 4.1): random tokens; a trigger token once, at a random
    position, followed by some token; the sequence ends with the trigger again, whose target is that token.

    Vocabulary: 0 … ``n_symbols`` - 1 random tokens, ``n_symbols`` the trigger. Build one instance per
    length to test a model trained at one length on longer ones. Chance: 1 / ``n_symbols``.
    """

    def __init__(self, length: int = 256, n_symbols: int = 16):
        for name, value, low in [("length", length, 4), ("n_symbols", n_symbols, 2)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.length, self.n_symbols = length, n_symbols
        self.trigger, self.vocab_size, self.chance = n_symbols, n_symbols + 1, 1 / n_symbols

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, length); targets (B, length), IGNORE except at the last position."""
        x = torch.randint(0, self.n_symbols, (batch_size, self.length), generator=generator)
        where = torch.randint(0, self.length - 2, (batch_size,), generator=generator)  # the first trigger
        rows = torch.arange(batch_size)
        x[rows, where] = self.trigger
        x[:, -1] = self.trigger
        y = torch.full_like(x, IGNORE)
        y[:, -1] = x[rows, where + 1]
        return x, y


class MixedLengths:
    """One task at several lengths: every batch is drawn at one of them, chosen uniformly at random.

    ``tasks`` are instances of one task at different lengths (same vocabulary). Trained on a mix, a
    model cannot tie a role (the i-th marker, the i-th data token) to a fixed position or lag; a
    time-invariant kernel then has to learn every length's gaps, a selective update the rule itself.
    """

    def __init__(self, tasks: Iterable):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("MixedLengths needs at least one task")
        vocabularies = {task.vocab_size for task in self.tasks}
        if len(vocabularies) != 1 or len({type(task) for task in self.tasks}) != 1:
            raise ValueError(f"MixedLengths needs one task at several lengths (one class, one vocabulary), got "
                             f"{[(type(task).__name__, task.vocab_size) for task in self.tasks]}")
        self.lengths = [task.length for task in self.tasks]
        self.vocab_size, self.chance = self.tasks[0].vocab_size, self.tasks[0].chance

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, L) of one task, L one of ``lengths``."""
        task = self.tasks[int(torch.randint(len(self.tasks), (1,), generator=generator))]
        return task(batch_size, generator)


class PlantedCopy:
    """A local stream with a few long-range copies: needs long context in some heads only.

    The stream is an order-2 Markov chain over ``alphabet`` symbols (a fixed random table, rows drawn
    from a Dirichlet(``concentration``), seeded by ``table_seed``). In each sequence of ``length``
    tokens one position s gets a payload symbol (one of ``payloads`` extra symbols) and position
    s + ``distance`` a marker; the marker's target is that payload (the "copy" position). Every other
    position whose order-2 context and next symbol are untouched is a "local" position, scored on
    the next symbol. A model that cannot see ``distance`` positions back copies at chance, 1 / payloads.

    Vocabulary: stream symbols 0..A-1, payloads A..A+P-1, the marker A+P.
    """

    def __init__(self, length: int = 256, distance: int = 100, alphabet: int = 8, payloads: int = 8,
                 concentration: float = 0.3, table_seed: int = 0):
        import numpy as np

        for name, value in (("length", length), ("distance", distance), ("alphabet", alphabet),
                            ("payloads", payloads), ("table_seed", table_seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 1 <= distance < length - 1:
            raise ValueError(f"distance must be in [1, length - 2 = {length - 2}], got {distance}")
        if alphabet < 2 or payloads < 2 or concentration <= 0:
            raise ValueError(f"alphabet and payloads must be >= 2 and concentration > 0, got "
                             f"{alphabet}, {payloads}, {concentration}")
        self.length, self.distance, self.alphabet, self.payloads = length, distance, alphabet, payloads
        rows = np.random.default_rng(table_seed).dirichlet([concentration] * alphabet, size=(alphabet, alphabet))
        self.table = torch.tensor(rows, dtype=torch.float64)  # P(c | a, b): (A, A, A)
        self.marker, self.vocab_size, self.chance = alphabet + payloads, alphabet + payloads + 1, 1 / payloads

    def __call__(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: inputs (B, L) and targets (B, L) (next symbol, the payload at the marker, or IGNORE)."""
        n, a, rows = self.length, self.alphabet, torch.arange(batch_size)
        x = torch.empty(batch_size, n, dtype=torch.long)
        x[:, :2] = torch.randint(0, a, (batch_size, 2), generator=generator)
        table = self.table.view(a * a, a)
        for t in range(2, n):
            x[:, t] = torch.multinomial(table[x[:, t - 2] * a + x[:, t - 1]], 1, generator=generator)[:, 0]
        y = torch.full_like(x, IGNORE)
        y[:, 1:-1] = x[:, 2:]  # local targets from position 1 on (an order-2 context exists)
        source = torch.randint(0, n - self.distance, (batch_size,), generator=generator)
        payload = torch.randint(a, a + self.payloads, (batch_size,), generator=generator)
        for planted in (source, source + self.distance):  # its context or next symbol was overwritten
            for offset in (-1, 0, 1):
                y[rows, (planted + offset).clamp(0, n - 1)] = IGNORE
        x[rows, source], x[rows, source + self.distance] = payload, self.marker
        y[rows, source + self.distance] = payload
        return x, y

    def levels(self) -> dict[str, float]:
        """Expected loss (nats) on the local positions of a model that knows the chain and sees the last
        0, 1 or 2 symbols: the entropies of the stationary chain. Order 2 is the floor."""
        a, table = self.alphabet, self.table
        pairs = torch.full((a, a), 1.0 / a**2, dtype=torch.float64)  # stationary P(a, b) by power iteration
        for _ in range(10_000):
            pairs, previous = torch.einsum("ab,abc->bc", pairs, table), pairs
            if (pairs - previous).abs().max() < 1e-13:
                break

        def entropy(p):
            return -(p * p.clamp_min(1e-300).log()).sum(-1)

        last = pairs.sum(0)  # P(b)
        order1 = torch.einsum("ab,abc->bc", pairs, table) / last[:, None]  # P(c | b)
        order0 = torch.einsum("ab,abc->c", pairs, table)
        return {"order 0": entropy(order0).item(), "order 1": (last * entropy(order1)).sum().item(),
                "order 2 (the chain)": (pairs * entropy(table)).sum().item()}

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean loss over local positions plus mean loss over copy positions (each kind counts equally,
        though a sequence has hundreds of local positions and one copy), plus any auxiliary loss."""
        x, y = batch
        out = model(x)
        losses = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                 reduction="none")
        copy, local = self._kinds(y.flatten())
        loss = losses[local].mean() + losses[copy].mean()
        aux = getattr(out, "aux_loss", None)
        return loss if aux is None else loss + aux

    def _kinds(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        copy = y >= self.alphabet
        return copy, (y != IGNORE) & ~copy

    @torch.no_grad()
    def score(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """``copy_accuracy`` (arg-max at the copy positions, with ``per_item`` 0/1 for paired tests)
        and ``local_loss`` (mean nats at the local positions)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        right, local_sum, local_count = [], 0.0, 0
        for x, y in batches:
            logits, y = model(x.to(device)).logits.flatten(0, 1).float(), y.to(device).flatten()
            copy, local = self._kinds(y)
            right.append((logits[copy].argmax(-1) == y[copy]).cpu())
            local_sum += F.cross_entropy(logits[local], y[local], reduction="sum").item()
            local_count += int(local.sum())
        model.train(was_training)
        items = torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)
        if items.numel() == 0 or local_count == 0:
            raise ValueError(f"the batches hold {items.numel()} copy and {local_count} local positions; "
                             "scoring needs both (pass at least one batch of this task)")
        return {"copy_accuracy": items.float().mean().item(), "copy_correct": int(items.sum()),
                "copy_total": items.numel(), "local_loss": local_sum / local_count, "per_item": items.int().tolist()}
