"""gemmatune.evaluate's metrics against hand-computed cases and an independent edit distance."""
import functools
import random

import pytest

import gemmatune.data.messages as data_messages
from gemmatune.generation.evaluate import (character_error_rate, edit_distance, exact_match, normalize_words,
                                           prompt_and_reference, word_error_rate)


def reference_distance(a, b) -> int:
    """The recursive definition, memoised: independent of the dynamic programme under test."""
    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_known_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance(["a", "b"], ["a", "b"]) == 0


def test_edit_distance_matches_the_definition_on_random_strings():
    gen = random.Random(0)
    for _ in range(200):
        a = "".join(gen.choice("abc") for _ in range(gen.randint(0, 7)))
        b = "".join(gen.choice("abc") for _ in range(gen.randint(0, 7)))
        assert edit_distance(a, b) == reference_distance(a, b), (a, b)


def test_word_error_rate_counts_substitutions_deletions_insertions():
    # "sat" -> "sit" (substitution), "the" before "mat" deleted: 2 edits over 6 reference words
    assert word_error_rate(["the cat sit on mat"], ["the cat sat on the mat"]) == pytest.approx(2 / 6)
    assert word_error_rate(["Hello, World!"], ["hello world"]) == 0  # normalised by default
    assert word_error_rate(["Hello, World!"], ["hello world"], normalize=False) == 1
    # summed over rows, divided by all reference words: 1 edit over 2 + 4 words
    assert word_error_rate(["a", "b c d e"], ["a x", "b c d e"]) == pytest.approx(1 / 6)
    assert word_error_rate(["x y z"], ["a"]) == 3  # insertions can push it above 1


def test_character_error_rate_and_exact_match():
    assert character_error_rate(["\\frac{a}{b}"], ["\\frac{a}{c}"]) == pytest.approx(1 / 11)
    assert character_error_rate([" x^2 "], ["x^2"]) == 0
    assert exact_match(["x^2", "y"], [" x^2", "z"]) == 0.5
    with pytest.raises(ValueError, match="in pairs"):
        exact_match(["a"], ["a", "b"])


def test_normalize_words():
    assert normalize_words("  It's   a TEST.  ") == "its a test"


def test_prompt_and_reference_splits_off_the_answer():
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt, reference = prompt_and_reference(row)
    assert reference == "4" and [m["role"] for m in prompt] == ["user"]
    with pytest.raises(ValueError, match="no answer"):  # to_messages' own error
        prompt_and_reference({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match="nothing to score"):
        prompt_and_reference({}, formatting_func=lambda row: [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_score_generates_from_the_medium_repeatably(kind):
    """Greedy answers on bundled held-out rows with the tiny model: one per row, the same on a
    second run, and they depend on the medium (another image/clip gives another first token)."""
    import torch

    import gemmatune.data.batches as data_batches
    import gemmatune.data.rows as data_rows
    from gemmatune.generation.evaluate import generate_answer, score
    from tests.helpers import load_tiny

    model, tokenizer = load_tiny(modalities=("text", kind), use_kernels=False)  # the interpreter is slow per token
    name, prompt = ("formulas", "Write the LaTeX.") if kind == "image" else ("speech", "Transcribe this audio.")
    format_row = getattr(data_messages, f"{kind}_to_text")(prompt)
    rows = data_rows.load_bundled_dataset(name, "test")[:3]
    media = {"max_soft_tokens": 70} if kind == "image" else {}
    first = score(model, tokenizer, rows, formatting_func=format_row, max_new_tokens=6, progress=False, **media)
    again = score(model, tokenizer, rows, formatting_func=format_row, max_new_tokens=6, progress=False, **media)
    assert len(first.predictions) == 3 and first.predictions == again.predictions
    assert first.references == [r["text"] for r in rows] and set(first.metrics) == {"exact_match",
                                                                                    "character_error_rate"}
    logits = []
    for row in rows[:2]:
        messages, _ = prompt_and_reference(row, format_row)
        inputs = data_batches.prompt_batch(tokenizer, [messages], **media)
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])  # the prompt text is the same: the medium differs
    assert isinstance(generate_answer(model, tokenizer, messages, max_new_tokens=2, **media), str)
