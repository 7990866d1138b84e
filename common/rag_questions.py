"""The RAG question set: hand-written questions and questions generated from the Wikipedia summaries.

``load_questions`` reads ``rag_questions.json``; ``check_questions`` proves each question is what it
claims (its article states the answer, an entity-free question does not name it, an unanswerable one
uses words no article has, dev and test share no article); ``build_question_set`` draws the generated
questions (``candidate_questions``) and splits dev/test. Rebuild the file offline with
``python -m common.rag_questions build-questions``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.rag import is_correct, normalise_answer, split_sentences

QUESTIONS_FILE = Path(__file__).with_name("rag_questions.json")
QUESTION_TYPES = ("named, hand-written", "entity-free, hand-written", "entity-free, description",
                  "entity-free, definition", "named, cloze year", "named, cloze number", "unanswerable")
UNANSWERABLE = "unanswerable"
GENERATED_TYPES = QUESTION_TYPES[2:6]  # the kinds ``candidate_questions`` draws from the articles
HAND_QUESTIONS_FILE = Path(__file__).with_name("rag_questions_hand.json")
BLANK = "____"
_YEAR = re.compile(r"^1[0-9]{3}$|^20[0-2][0-9]$")
_NUMBER_TOKEN = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,]|\.\d)"  # 7,088 or 9,200,000.5
                           r"|(?<![\w.,])\d+(?:\.\d+)?(?![\w,]|\.\d)")  # 1610 or 29.5
_DIGITS = re.compile(r"\d")
_DEFINITION = re.compile(r"^(?:The |An |A )?(?P<name>[^,(]+?)(?: \([^)]*\))?(?:, [^,]{1,80},)? "
                         r"(?P<verb>is|was|are|were) "
                         r"(?P<rest>.+?)\.?$")


def answer_name(title: str) -> str:
    """A title as an answer: without its disambiguation ("Mercury (planet)" -> "Mercury")."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip()


def content_words(text: str) -> set[str]:
    """Normalised words of ``text`` that carry meaning: no stop words, at least three characters."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return {w for w in normalise_answer(text).split() if len(w) >= 3 and w not in ENGLISH_STOP_WORDS}


def _cloze(record: dict, want_year: bool) -> tuple[str, str] | None:
    """A sentence of the article with its only number blanked: (question, answer), or None."""
    for sentence in split_sentences(record["extract"])[1:]:
        words = sentence.split()
        numbers = _NUMBER_TOKEN.findall(sentence)
        if not 8 <= len(words) <= 35 or len(numbers) != 1 or len(_DIGITS.findall(sentence)) != len(
                re.sub(r"\D", "", numbers[0])):
            continue  # exactly one number, and no other digit anywhere in the sentence
        number = numbers[0]
        if bool(_YEAR.match(number)) != want_year or (not want_year and len(re.sub(r"\D", "", number)) < 2):
            continue
        masked = _NUMBER_TOKEN.sub(BLANK, sentence, count=1)
        if not re.match(r"[A-Z\"']", masked):
            continue  # a whole sentence, starting with its first word
        kind = "year" if want_year else "number"
        return f'Fill in the {kind} ({record["title"]}): "{masked}"', number
    return None


def _description_question(record: dict, lowercase_first: bool) -> str:
    description = record["description"].strip().rstrip(".")
    if lowercase_first:
        description = description[0].lower() + description[1:]
    if record.get("topic") == "People":
        dead = re.search(r"[–-]\s*\d{3,4}\)", description)  # "(1898–1956)": no longer living
        return f"Who {'was' if dead else 'is'} the {description}?"
    return f"What is the {description}?"


def _definition(record: dict) -> tuple[str, str] | None:
    """The first sentence split into (verb, what the subject is), when it opens with the title."""
    first = split_sentences(record["extract"])[0].replace("\n", " ")
    match = _DEFINITION.match(first)
    if not match or normalise_answer(match["name"]) != normalise_answer(answer_name(record["title"])):
        return None
    rest = match["rest"].strip()
    if not 6 <= len(rest.split()) <= 30 or not rest[0].islower():
        return None
    return match["verb"], rest


def _definition_question(record: dict, verb: str, rest: str) -> str:
    if record.get("topic") == "People":
        return f"Who {'was' if verb in ('was', 'were') else 'is'} {rest}?"
    return f"What {verb} {rest}?"


def _signature(text: str) -> tuple[frozenset, frozenset]:
    """(content words without digits, numbers) of a description or definition."""
    return frozenset(content_words(re.sub(r"\d", " ", text))), frozenset(re.findall(r"\d+", text))


def _near_duplicates(signatures: Sequence[tuple[frozenset, frozenset] | None], owners: Sequence[int]) -> set[int]:
    """Indices whose signature one of another owner nearly repeats: the same numbers, word Jaccard >= 0.5."""
    sharing: dict[tuple[frozenset, str], list[int]] = {}
    for i, signature in enumerate(signatures):
        if signature:
            for word in signature[0]:
                sharing.setdefault((signature[1], word), []).append(i)
    out = set()
    for i, signature in enumerate(signatures):
        if signature:
            words, numbers = signature
            near = {j for word in words for j in sharing[numbers, word] if owners[j] != owners[i]}
            if any(len(words & signatures[j][0]) >= 0.5 * len(words | signatures[j][0]) for j in near):
                out.add(i)
    return out


def candidate_questions(records: Sequence[dict], kind: str) -> list[dict]:
    """Every question of one generated ``kind`` that the corpus gives, one per article at most.

    ``entity-free, description``: the article's short description as a question ("What is the fifth
    planet from the Sun?"), answer the title; ``entity-free, definition``: the first sentence with the
    subject removed ("What is a desert spanning North Africa?"), answer the title; ``named, cloze year``
    / ``named, cloze number``: a sentence whose only number is blanked, answer that number.
    The entity-free kinds keep a question only when the article states the title, the question shares no
    content word with the title, and no other article's description or definition nearly repeats it (the
    same numbers and half the content words or more), since its answer would not be unique; a description
    also needs five words or a number, and must not open with a participle ("Used to measure ...").
    """
    if kind not in GENERATED_TYPES:
        raise ValueError(f"kind must be one of {GENERATED_TYPES}, got {kind!r}")
    if kind.startswith("named"):
        out = []
        for record in records:
            cloze = _cloze(record, want_year=kind == "named, cloze year")
            if cloze:
                out.append({"title": record["title"], "type": kind, "question": cloze[0], "answers": [cloze[1]]})
        return out
    descriptions = [(r.get("description") or "").strip() for r in records]
    definitions = [_definition(r) for r in records]
    n = len(records)
    # one pool of signatures: descriptions first, then definitions; a question must be unique in both
    duplicates = _near_duplicates([_signature(d) if d else None for d in descriptions]
                                  + [_signature(d[1]) if d else None for d in definitions], [*range(n), *range(n)])
    lower_counts: dict[str, int] = {}  # > 0: a word written in lower case inside sentences (not a name)
    if kind == "entity-free, description":
        for record in records:
            for word in re.findall(r"(?<=[a-z,;] )[A-Za-z]+", record["extract"]):
                lower_counts[word.lower()] = lower_counts.get(word.lower(), 0) + (1 if word.islower() else -1)
    out = []
    for i, record in enumerate(records):
        name = answer_name(record["title"])
        if not is_correct(record["extract"], [name]):
            continue
        if kind == "entity-free, description":
            d = descriptions[i]
            first = re.match(r"[A-Za-z]*", d)[0].lower()
            if (i in duplicates or (len(d.split()) < 5 and not re.search(r"\d", d))
                    or (first.endswith("ed") and len(first) > 4)):
                continue
            question = _description_question(record, lower_counts.get(first, 0) > 0)
        else:
            if definitions[i] is None or n + i in duplicates:
                continue
            question = _definition_question(record, *definitions[i])
        if not content_words(question) & content_words(record["title"]):
            out.append({"title": record["title"], "type": kind, "question": question, "answers": [name]})
    return out


def build_question_set(records: Sequence[dict], hand: Sequence[dict], sizes: dict[str, tuple[int, int]],
                       seed: int = 0, dev_share_hand: float = 0.35) -> list[dict]:
    """The question set with its dev/test split, built from the corpus and the hand-written questions.

    ``hand``: the hand-written questions (types ``named, hand-written``, ``entity-free, hand-written``,
    ``unanswerable``; a hand question may carry ``"split"``). ``sizes``: per generated type, (dev, test)
    counts drawn at random (``seed``) from ``candidate_questions``. An article gives at most one
    generated question, and never one whose article a hand-written question uses, so dev and test
    share no article through the generated questions. Hand-written questions without a split go to
    dev with probability ``dev_share_hand``, except those whose article is in dev already.
    """
    rng = np.random.default_rng(seed)
    questions = []
    used = {q["title"] for q in hand if q.get("title")}
    dev_titles = {q["title"] for q in hand if q.get("split") == "dev" and q.get("title")}
    for q in hand:
        q = dict(q)
        if "split" not in q:
            q["split"] = "dev" if q.get("title") in dev_titles or rng.random() < dev_share_hand else "test"
        questions.append(q | {"source": "hand"})
    for kind, (n_dev, n_test) in sizes.items():
        pool = [q for q in candidate_questions(records, kind) if q["title"] not in used]
        if len(pool) < n_dev + n_test:
            raise ValueError(f"{kind}: {len(pool)} candidates for {n_dev} + {n_test} questions")
        for rank, j in enumerate(rng.permutation(len(pool))[:n_dev + n_test]):
            used.add(pool[j]["title"])
            questions.append(pool[j] | {"split": "dev" if rank < n_dev else "test", "source": "generated"})
    for number, q in enumerate(questions):
        q["id"] = number
        q["entity_free"] = q["type"].startswith("entity-free")
    return questions


def load_questions(path: str | Path = QUESTIONS_FILE, split: str | None = None) -> list[dict]:
    """The question set: dicts with ``id``, ``split`` (dev/test), ``type``, ``entity_free``, ``question``,
    ``answers``, ``title`` (the source article; None for an unanswerable question, which lists instead
    the ``absent`` words that no article contains) and ``source`` (hand-written or generated)."""
    if split not in (None, "dev", "test"):
        raise ValueError(f"split must be None, 'dev' or 'test', got {split!r}")
    questions = json.loads(Path(path).read_text(encoding="utf-8"))
    return [q for q in questions if split is None or q.get("split") == split]


def check_questions(questions: Sequence[dict], records_by_title: dict[str, dict]) -> None:
    """Raise ValueError unless every question is what it claims to be.

    An answerable question: its article exists and states one of its answers (whole words, after
    ``normalise_answer``); an entity-free one does not contain its answer. An unanswerable question:
    none of its ``absent`` words is in any article (title or extract). No question text twice; no
    article in both dev and test.
    """
    corpus = None
    seen: set[str] = set()
    splits: dict[str, set[str]] = {}
    for q in questions:
        text = q["question"]
        if text in seen:
            raise ValueError(f"question {text!r} appears twice")
        seen.add(text)
        kind = q.get("type")
        if kind is not None and kind not in QUESTION_TYPES:
            raise ValueError(f"question {text!r}: type {kind!r} is not one of {QUESTION_TYPES}")
        if kind == UNANSWERABLE:
            if q.get("title") is not None or q.get("answers") or not q.get("absent"):
                raise ValueError(f"unanswerable question {text!r}: needs title None, no answers, absent words")
            if corpus is None:
                corpus = " " + " ".join(normalise_answer(f"{r['title']} {r['extract']}")
                                        for r in records_by_title.values()) + " "
            present = [w for w in q["absent"] if f" {normalise_answer(w)} " in corpus]
            if present:
                raise ValueError(f"unanswerable question {text!r}: {present} do occur in the corpus")
            continue
        record = records_by_title.get(q["title"])
        if record is None:
            raise ValueError(f"question {text!r}: no article titled {q['title']!r}")
        if not is_correct(record["extract"], q["answers"]):
            raise ValueError(f"question {text!r}: none of {q['answers']} is in {q['title']!r}")
        if q.get("entity_free") and is_correct(text, q["answers"]):
            raise ValueError(f"entity-free question {text!r} names its answer {q['answers']}")
        if "split" in q:
            splits.setdefault(q["title"], set()).add(q["split"])
    shared = sorted(t for t, s in splits.items() if len(s) > 1)
    if shared:
        raise ValueError(f"articles in both dev and test: {shared[:5]}{' ...' if len(shared) > 5 else ''}")


QUESTION_SIZES = {"entity-free, description": (20, 55), "entity-free, definition": (20, 45),
                  "named, cloze year": (12, 30), "named, cloze number": (12, 30)}
QUESTION_SEED = 0


def write_question_set(path: str | Path = QUESTIONS_FILE, records: Sequence[dict] | None = None) -> list[dict]:
    """Build the question set (hand-written + generated, ``QUESTION_SIZES``), check it, write it to ``path``."""
    from common.data import load_wikipedia_summaries

    records = list(records) if records is not None else load_wikipedia_summaries()
    hand = json.loads(HAND_QUESTIONS_FILE.read_text(encoding="utf-8"))
    questions = build_question_set(records, hand, QUESTION_SIZES, QUESTION_SEED)
    check_questions(questions, {r["title"]: r for r in records})
    path = Path(path)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(questions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return questions


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build and check the RAG question set (offline).")
    parser.add_argument("command", choices=["build-questions"])
    parser.add_argument("--out", default=str(QUESTIONS_FILE))
    args = parser.parse_args()
    built = write_question_set(args.out)
    counts: dict[tuple[str, str], int] = {}
    for q in built:
        counts[q["split"], q["type"]] = counts.get((q["split"], q["type"]), 0) + 1
    print(f"{len(built)} questions -> {args.out}")
    for (split, kind), n in sorted(counts.items()):
        print(f"  {split:4s} {kind:28s} {n}")
