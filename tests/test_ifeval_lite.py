"""Tests for tasks/ifeval_lite.py: the checks, the generator's contract and the bundled data."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import ifeval_lite as il  # noqa: E402

SEEDS = [0, 1, 2, 7, 123]


@pytest.fixture(scope="module", params=SEEDS)
def dataset(request):
    return il.make_dataset(request.param, 150, 60)


def ok(response, **spec):
    return il.check(response, [spec])[0]


# ----------------------------------------------------------------------------- generator contract

def test_chosen_passes_every_constraint(dataset):
    for row in dataset[0] + dataset[1]:
        assert all(il.check(row["chosen"], row["constraints"])), row


def test_rejected_fails_exactly_the_violated_constraint(dataset):
    for row in dataset[0] + dataset[1]:
        types = [c["type"] for c in row["constraints"]]
        assert row["violated"] in types
        assert len(set(types)) == len(types)
        expected = [t != row["violated"] for t in types]
        assert il.check(row["rejected"], row["constraints"]) == expected, row
        assert row["rejected"] != row["chosen"]


def test_row_shape_and_sizes(dataset):
    for row in dataset[0] + dataset[1]:
        assert set(row) == {"prompt", "chosen", "rejected", "constraints", "violated", "topic"}
        assert 1 <= len(row["constraints"]) <= 3
        assert 18 <= len(row["chosen"].split()) <= 90
        assert row["prompt"].startswith(tuple(o.split("{")[0] for o in il.OPENERS))
        assert row["topic"] in row["prompt"]
        for c in row["constraints"]:
            assert c["type"] in il.TYPES
            pairs = {frozenset((c["type"], d["type"])) for d in row["constraints"] if d is not c}
            assert not pairs & il.INCOMPATIBLE, row["constraints"]


def test_every_type_is_used_and_violated():
    train, _ = il.make_dataset(0, 400, 10)
    assert {c["type"] for r in train for c in r["constraints"]} == set(il.TYPES)
    assert {r["violated"] for r in train} == set(il.TYPES)


def test_splits_share_no_prompt_and_no_topic(dataset):
    train, held = dataset
    assert len(train) == 150 and len(held) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert not {r["topic"] for r in train} & {r["topic"] for r in held}
    # held-out topics are not even mentioned in any training prompt
    for topic in {r["topic"] for r in held}:
        assert not any(topic in r["prompt"] for r in train)
    assert len({r["prompt"] for r in train}) == len(train)
    assert len({r["prompt"] for r in held}) == len(held)


def test_topic_split():
    train, held = il.split_topics(0)
    assert len(TOPICS := il.TOPICS) >= 40
    assert set(train) | set(held) == set(TOPICS) and not set(train) & set(held)
    assert len(held) == len(TOPICS) // 4
    assert il.split_topics(0) == (train, held) and il.split_topics(1) != (train, held)
    for topic in TOPICS:
        assert len(il.sentences(topic)) == 5 and topic == topic.lower()


def test_determinism():
    a = il.make_dataset(3, 50, 20)
    assert a == il.make_dataset(3, 50, 20)
    b = il.make_dataset(4, 50, 20)
    assert a[0] != b[0] and a[1] != b[1]
    # each split has its own random stream: held-out rows do not depend on n_train
    assert il.make_dataset(3, 10, 20)[1] == a[1]
    assert il.make_dataset(3, 50, 5)[0] == a[0]


def test_bundled_data_matches_code():
    train, held = il.make_dataset(0, 400, 100)
    assert il.read_jsonl(ROOT / "data" / "ifeval_lite_train.jsonl") == train
    assert il.read_jsonl(ROOT / "data" / "ifeval_lite_heldout.jsonl") == held
    assert (ROOT / "data" / "ifeval_lite_train.jsonl").read_text(encoding="utf-8") == il.to_jsonl(train)


# ----------------------------------------------------------------------------- hand-written checks

def test_lowercase():
    assert ok("all lowercase here. numbers 42 and symbols !? are fine", type="lowercase")
    assert ok("café, naïve\n* bullet\n", type="lowercase")
    assert not ok("Water rises and cools.", type="lowercase")
    assert not ok("the sun heats the Ocean", type="lowercase")
    assert not ok("ÉCOLE", type="lowercase")


def test_word_count_max_and_min():
    five = "one two three four five"
    assert ok(five, type="word_count_max", n=5) and not ok(five, type="word_count_max", n=4)
    assert ok(five, type="word_count_min", n=5) and not ok(five, type="word_count_min", n=6)
    # words are whitespace-separated tokens: punctuation sticks, newlines and runs of spaces split
    messy = "  one,two   three\n\nfour  \n"  # 3 words: "one,two", "three", "four"
    assert ok(messy, type="word_count_max", n=3) and not ok(messy, type="word_count_max", n=2)
    assert ok(messy, type="word_count_min", n=3) and not ok(messy, type="word_count_min", n=4)
    assert ok("well-known fact", type="word_count_max", n=2)
    assert not ok("* a\n* b", type="word_count_max", n=3)  # bullet markers count as words


def test_keyword_and_forbidden_word():
    assert ok("Honey is SWEET.", type="keyword", word="sweet")  # case-insensitive
    assert ok("It is oxygen-rich blood", type="keyword", word="oxygen")
    assert not ok("Bees make honey", type="keyword", word="bee")  # whole words only
    assert not ok("sweetness", type="keyword", word="sweet")
    assert ok("Bees make honey", type="forbidden_word", word="bee")
    assert ok("no such word here", type="forbidden_word", word="honey")
    assert not ok("I like Honey.", type="forbidden_word", word="honey")
    assert not ok('{"answer": "honey"}', type="forbidden_word", word="honey")


def test_bullets():
    assert ok("* one\n* two\n* three", type="bullets", n=3)
    assert ok("- one\n- two", type="bullets", n=2)
    assert ok("Intro line\n* one\n- two\n  * nested\nIs there anything else?\n", type="bullets", n=3)
    assert not ok("*one\n*two", type="bullets", n=2)  # marker must be followed by a space
    assert not ok("**Bold** start\n* one", type="bullets", n=2)
    assert not ok("* one\n* two\n* three", type="bullets", n=2)  # exactly n
    assert not ok("1. one\n2. two", type="bullets", n=2)  # numbered lists are not bullets
    assert not ok("-5 degrees\n- one", type="bullets", n=2)


def test_end_phrase():
    p = "Is there anything else I can help with?"
    assert ok("Some text. " + p, type="end_phrase", phrase=p)
    assert ok("Some text.\n" + p + "  \n\n", type="end_phrase", phrase=p)  # trailing whitespace ok
    assert not ok("Some text. " + p.lower(), type="end_phrase", phrase=p)  # case-sensitive
    assert not ok(p + " Bye.", type="end_phrase", phrase=p)
    assert not ok("Some text. " + p[:-1], type="end_phrase", phrase=p)


def test_json():
    assert ok('{"topic": "tea", "answer": "Steep it."}', type="json")
    assert ok('  [1, 2, 3]\n', type="json")
    assert ok('```json\n{"a": 1}\n```', type="json")
    assert ok('```\n{"a": 1}\n```\n', type="json")
    assert not ok('Here is JSON: {"a": 1}', type="json")
    assert not ok('{"a": 1,}', type="json")
    assert not ok('```json\n{"a": 1}\n```\nHope this helps', type="json")
    assert not ok("Just prose.", type="json")


def test_num_paragraphs():
    assert ok("First part.\n\nSecond part.", type="num_paragraphs", n=2)
    assert ok("\n\nOne.\n \t\nTwo.\n\n\n\nThree.\n\n", type="num_paragraphs", n=3)
    assert ok("Line one\nline two of the same paragraph", type="num_paragraphs", n=1)
    assert not ok("First part.\nSecond part.", type="num_paragraphs", n=2)
    assert not ok("A.\n\nB.\n\nC.", type="num_paragraphs", n=2)


def test_no_commas():
    assert ok("No commas here. None at all!", type="no_commas")
    assert ok("semi; colon: dash - fine", type="no_commas")
    assert not ok("First, boil the water.", type="no_commas")
    assert not ok('{"a": 1, "b": 2}', type="no_commas")


def test_empty_response_fails_everything():
    specs = [{"type": "lowercase"}, {"type": "word_count_max", "n": 10}, {"type": "forbidden_word", "word": "x"},
             {"type": "no_commas"}]
    assert il.check("", specs) == [False] * 4
    assert il.check("  \n ", specs) == [False] * 4
    assert il.check_loose(" \n", specs) == [False] * 4


def test_unknown_type_raises():
    with pytest.raises(KeyError):
        il.check("text", [{"type": "nope"}])


# ----------------------------------------------------------------------------- loose vs strict, score

def test_loose_vs_strict():
    response = "Sure! Here is my answer:\nwater rises and cools.\nthen it falls as rain."
    specs = [{"type": "lowercase"}, {"type": "no_commas"}]
    assert il.check(response, specs) == [False, True]
    assert il.check_loose(response, specs) == [True, True]  # first line dropped
    bold = "**Tea** is steeped.\n* a\n* b"
    assert il.check(bold, [{"type": "bullets", "n": 0}]) == [False]
    assert il.check_loose(bold, [{"type": "bullets", "n": 0}]) == [True]  # '*' stripped
    ending = "Steep the tea. Is there anything else I can help with?\nP.S. enjoy"
    spec = [{"type": "end_phrase", "phrase": "Is there anything else I can help with?"}]
    assert il.check(ending, spec) == [False] and il.check_loose(ending, spec) == [True]  # last line dropped
    assert il.check_loose("Plain Text", [{"type": "lowercase"}]) == [False]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aB *-,\n{}\":1x.", max_size=40), st.integers(0, 4))
def test_strict_implies_loose(text, n):
    specs = [{"type": t} for t in ("lowercase", "json", "no_commas")] + [
        {"type": "bullets", "n": n}, {"type": "num_paragraphs", "n": n}, {"type": "word_count_max", "n": n},
        {"type": "keyword", "word": "x"}, {"type": "end_phrase", "phrase": "x."}]
    for s, l in zip(il.check(text, specs), il.check_loose(text, specs)):
        assert l or not s


def test_score():
    rows = [
        {"constraints": [{"type": "lowercase"}, {"type": "no_commas"}]},
        {"constraints": [{"type": "json"}]},
    ]
    responses = ["Intro, line\nall lower and no commas", "not json"]
    s = il.score(responses, rows)
    assert s["n_prompts"] == 2 and s["n_instructions"] == 3
    assert s["prompt_strict_acc"] == 0.0 and s["instruction_strict_acc"] == 0.0
    assert s["prompt_loose_acc"] == 0.5 and s["instruction_loose_acc"] == pytest.approx(2 / 3)
    assert s["by_type"] == {"json": 0.0, "lowercase": 0.0, "no_commas": 0.0}
    assert s["by_type_loose"] == {"json": 0.0, "lowercase": 1.0, "no_commas": 1.0}
    with pytest.raises(ValueError):
        il.score(["a"], rows)


def test_score_chosen_vs_rejected():
    _, held = il.make_dataset(0, 0, 100)
    assert il.score([r["chosen"] for r in held], held)["prompt_strict_acc"] == 1.0
    rej = il.score([r["rejected"] for r in held], held)
    assert rej["prompt_strict_acc"] == 0.0
    n_inst = sum(len(r["constraints"]) for r in held)
    assert rej["instruction_strict_acc"] == pytest.approx((n_inst - len(held)) / n_inst)


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_and_checks(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "tasks.ifeval_lite", *a], cwd=ROOT,
                                    capture_output=True, text=True, check=True)
    run("--seed", "5", "--n-train", "12", "--n-heldout", "4", "--out", str(tmp_path / "d"))
    train = il.read_jsonl(tmp_path / "d" / "ifeval_lite_train.jsonl")
    held = il.read_jsonl(tmp_path / "d" / "ifeval_lite_heldout.jsonl")
    assert (train, held) == il.make_dataset(5, 12, 4)
    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text("".join(json.dumps({"response": r["chosen"], "constraints": r["constraints"]}) + "\n"
                               for r in train), encoding="utf-8")
    result = json.loads(run("--check", str(outputs)).stdout)
    assert result["prompt_strict_acc"] == 1.0 and result["n_prompts"] == 12
