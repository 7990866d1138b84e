"""Retrieval-augmented generation: passages, cache keys, the index, fusion, prompts, scoring."""

import numpy as np
import pytest

from common import rag

RECORDS = [
    {"title": "Alpha", "extract": "Alpha is the first letter. It comes before beta! Is it old? Yes, very old."},
    {"title": "Nile", "extract": "The Nile is a river in Africa. " + "It is very long indeed. " * 12},
    {"title": "Zed", "extract": " ".join(f"w{i}" for i in range(50))},  # one sentence, longer than a passage
]


class HashedBagOfWords:
    """A tiny deterministic 'embedder': each word adds a fixed random vector (no network, no weights)."""

    def __init__(self, d: int = 64):
        self.d = d

    def encode(self, sentences, **kwargs):
        out = np.zeros((len(sentences), self.d), dtype=np.float32)
        for row, text in enumerate(sentences):
            for word in rag.normalise_answer(text).split():
                seed = int.from_bytes(word.encode()[:8].ljust(8, b"\0"), "little") % (2**32)
                out[row] += np.random.default_rng(seed).standard_normal(self.d)
        return out


@pytest.mark.parametrize("max_words", [8, 12, 64])
def test_passages_cover_every_word_in_order(max_words):
    passages = rag.split_passages(RECORDS, max_words)
    for article, record in enumerate(RECORDS):
        words = [w for p in passages if p.article == article for w in p.text.split()]
        assert words == record["extract"].split()
        assert all(p.title == record["title"] for p in passages if p.article == article)
    assert all(len(p.text.split()) <= max_words for p in passages)


def test_passages_keep_sentences_whole_when_they_fit():
    passages = rag.split_passages(RECORDS[:1], max_words=9)
    assert [p.text for p in passages] == ["Alpha is the first letter. It comes before beta!",
                                          "Is it old? Yes, very old."]
    with pytest.raises(ValueError, match="max_words"):
        rag.split_passages(RECORDS, max_words=4)


def test_cache_key_changes_with_corpus_model_and_chunking():
    texts = ["a b", "c d"]
    key = rag.cache_key(texts, "model-1", max_words=64)
    assert key == rag.cache_key(list(texts), "model-1", max_words=64)
    assert key != rag.cache_key(["a b", "c e"], "model-1", max_words=64)
    assert key != rag.cache_key(["a", "b c d"], "model-1", max_words=64)  # same characters, other split
    assert key != rag.cache_key(texts, "model-2", max_words=64)
    assert key != rag.cache_key(texts, "model-1", max_words=32)


def test_inner_product_of_normalised_vectors_is_cosine():
    rng = np.random.default_rng(0)
    docs, queries = rng.standard_normal((50, 16)) * 5, rng.standard_normal((4, 16))
    scores, ids = rag.search(rag.build_index(rag.normalise(docs)), rag.normalise(queries), 50)
    cosine = queries @ docs.T / np.outer(np.linalg.norm(queries, axis=1), np.linalg.norm(docs, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, ids, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    np.testing.assert_array_equal(ids[:, 0], cosine.argmax(axis=1))


def test_hnsw_agrees_with_flat_on_a_small_set():
    vectors = rag.normalise(np.random.default_rng(1).standard_normal((300, 16)))
    _, exact = rag.search(rag.build_index(vectors, "flat"), vectors[:20], 1)
    _, approx = rag.search(rag.build_index(vectors, "hnsw", ef_search=128), vectors[:20], 1)
    np.testing.assert_array_equal(exact, approx)
    with pytest.raises(ValueError, match="kind"):
        rag.build_index(vectors, "ivf-typo")


def test_cached_index_is_built_once_and_rebuilt_when_the_corpus_changes(tmp_path):
    texts = [p.indexed for p in rag.split_passages(RECORDS, 12)]
    encoder = HashedBagOfWords()
    first, built = rag.cached_index(encoder, texts, "bow", tmp_path, progress=False, max_words=12)
    again, built_again = rag.cached_index(encoder, texts, "bow", tmp_path, progress=False, max_words=12)
    assert built and not built_again
    np.testing.assert_array_equal(first.reconstruct_n(0, first.ntotal), again.reconstruct_n(0, again.ntotal))
    _, rebuilt = rag.cached_index(encoder, texts[:-1], "bow", tmp_path, progress=False, max_words=12)
    assert rebuilt and len(list(tmp_path.glob("rag-index-*.faiss"))) == 2


def test_dense_retrieval_finds_a_planted_passage():
    filler = [{"title": f"T{i}", "extract": f"Filler text number {i} about nothing in particular."}
              for i in range(40)]
    planted = {"title": "Zorblax", "extract": "The zorblax festival is held in Quenthor every spring."}
    records = filler[:17] + [planted] + filler[17:]
    passages = rag.split_passages(records)
    encoder = HashedBagOfWords()
    index = rag.build_index(rag.embed(encoder, [p.indexed for p in passages]))
    retriever = rag.Retriever(encoder, index, passages, candidates=10)
    hits = retriever.retrieve(["Where is the zorblax festival held?"], k=3)[0]
    assert hits[0].title == "Zorblax" and len(hits) == 3
    hybrid = rag.Retriever(encoder, index, passages, bm25=rag.BM25([p.indexed for p in passages]), candidates=10)
    assert hybrid.retrieve(["zorblax festival"], k=1)[0][0].title == "Zorblax"
    with pytest.raises(ValueError, match="k must be"):
        retriever.retrieve(["x"], k=11)


def test_bm25_matches_the_formula():
    texts = ["red apple", "red red car", "blue sky"]
    bm25 = rag.BM25(texts, k1=1.2, b=0.75)
    n, avgdl = 3, 7 / 3
    idf_red = np.log1p((n - 2 + 0.5) / (2 + 0.5))
    expected = [idf_red * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / avgdl)),
                idf_red * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3 / avgdl)), 0.0]
    np.testing.assert_allclose(bm25.scores(["red"])[0], expected, rtol=1e-5)
    _, ids = bm25.search(["red", "sky"], k=1)
    np.testing.assert_array_equal(ids[:, 0], [1, 2])


def test_rrf_rewards_agreement_and_pads():
    fused = rag.rrf_fuse([np.array([[1, 2, 3]]), np.array([[2, 3, 9]])], k=5)
    assert fused[0, 0] == 2 and set(fused[0, :4]) == {1, 2, 3, 9} and fused[0, 4] == -1
    with pytest.raises(ValueError, match="weights"):
        rag.rrf_fuse([np.array([[1]])], k=1, weights=[1.0, 2.0])


def test_article_ranking_and_recall():
    passage_article = np.array([0, 0, 1, 2, 2, 3])
    ranked = rag.article_ranking(np.array([[1, 0, 4, 2], [5, 3, 4, 0]]), passage_article, depth=3)
    np.testing.assert_array_equal(ranked, [[0, 2, 1], [3, 2, 0]])
    assert rag.recall_at_k(ranked, np.array([2, 1]), [1, 2, 3]) == {1: 0.0, 2: 0.5, 3: 0.5}


def test_prompt_contains_the_passages_and_the_question():
    passages = rag.split_passages(RECORDS[:2])
    messages = rag.build_messages("How long is the Nile?", passages)
    user = messages[-1]["content"]
    assert all(p.text in user for p in passages) and "How long is the Nile?" in user
    assert "[1] Alpha:" in user and "[2] Nile:" in user
    assert "Passages" not in rag.build_messages("How long is the Nile?")[-1]["content"]


def test_answer_matching_is_normalised_and_whole_word():
    assert rag.is_correct("It is 7088 km long.", ["7,088"])
    assert rag.is_correct("The capital is Brasilia.", ["Brasília"])
    assert rag.is_correct("About 29.5 days", ["29.5"])
    assert not rag.is_correct("About 295 days", ["29.5"])
    assert not rag.is_correct("In 19210 or so", ["1921"])
    assert not rag.is_correct("Pisano", ["Pisa"])


def test_question_set_is_grounded_in_its_articles():
    questions = rag.load_questions()
    assert len(questions) >= 50 and len({q["question"] for q in questions}) == len(questions)
    by_title = {r["title"]: r for r in RECORDS}
    with pytest.raises(ValueError, match="no article"):
        rag.check_questions(questions[:1], by_title)
    with pytest.raises(ValueError, match="none of"):
        rag.check_questions([{"title": "Nile", "question": "q", "answers": ["Amazon"]}], by_title)
    rag.check_questions([{"title": "Nile", "question": "q", "answers": ["Africa"]}], by_title)


def test_diagnose_separates_the_failure_modes():
    passages = rag.split_passages(RECORDS)
    nile = [p for p in passages if p.title == "Nile"]
    alpha = [p for p in passages if p.title == "Alpha"]
    assert rag.diagnose("Africa", ["Africa"], nile, 1) == "correct"
    assert rag.diagnose("Asia", ["Africa"], nile, 1) == rag.FAILURES[2]
    assert rag.diagnose("Asia", ["Egypt"], nile, 1) == rag.FAILURES[1]
    assert rag.diagnose("Asia", ["Egypt"], alpha, 1) == rag.FAILURES[0]
