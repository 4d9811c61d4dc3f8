"""Scores on held-out rows: generate the answers, compare them with the references.

Why the notebooks score instead of eyeballing one answer: a fine-tune should show a number that
moves (exact match and character error rate for image -> LaTeX, word error rate for speech ->
text), measured the same way before and after training, on rows training never saw.

    scores = score(model, tokenizer, held_out_rows, formatting_func=image_to_text("Write the LaTeX."))
    scores.metrics            # {"exact_match": 0.12, "character_error_rate": 0.31}
    scores.predictions[0], scores.references[0]

Generation is greedy (repeatable), one row at a time through gemmatune's decode loop
(gemmatune.generation.replies.generate_replies: the same tokens as `model.generate`, static cache,
CUDA-graph steps on a GPU) with the row's image or clip turned into tensors exactly as for training
(gemmatune.data.batches.prompt_batch). Every row is read and checked before the first is answered:
a model without the tower the rows need is refused before any token.
The error rates are edit distances (Levenshtein) summed over all rows and divided by the
references' total length: one long reference weighs as much as its length, as jiwer computes them.
"""
import re
import string
from dataclasses import dataclass, field

from gemmatune.data.batches import media_kinds
from gemmatune.data.messages import prompt_messages, to_messages
from gemmatune.data.rows import keep_media_encoded
from gemmatune.generation.replies import generate_replies
from gemmatune.model.towers import require_towers

METRICS = ("exact_match", "character_error_rate", "word_error_rate")


def edit_distance(reference, hypothesis) -> int:
    """Levenshtein distance between two sequences (strings: characters; lists: words)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def normalize_words(text: str) -> str:
    """Lower case, punctuation removed, single spaces: how speech transcripts are usually compared
    (a model should not lose points for "Hello," against "hello")."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference (surrounding whitespace ignored)."""
    _check_lengths(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


def character_error_rate(predictions: list[str], references: list[str]) -> float:
    """Character edits needed over all rows / characters in all references."""
    _check_lengths(predictions, references)
    edits = sum(edit_distance(r.strip(), p.strip()) for p, r in zip(predictions, references))
    return edits / max(sum(len(r.strip()) for r in references), 1)


def word_error_rate(predictions: list[str], references: list[str], normalize: bool = True) -> float:
    """Word edits (substitutions, insertions, deletions) over all rows / words in all references;
    `normalize` compares normalize_words() of both."""
    _check_lengths(predictions, references)
    prep = normalize_words if normalize else (lambda s: " ".join(s.split()))
    pairs = [(prep(r).split(), prep(p).split()) for p, r in zip(predictions, references)]
    return sum(edit_distance(r, p) for r, p in pairs) / max(sum(len(r) for r, _ in pairs), 1)


def _check_lengths(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: score them in pairs")


def prompt_and_reference(row, formatting_func=None, where: str = "row") -> tuple[list[dict], str]:
    """(the conversation up to the last model turn, that turn's text) of a dataset row, its turns
    read as prepare_dataset reads them (roles mapped, ShareGPT or OpenAI keys)."""
    if formatting_func is None:
        messages = to_messages(row, where)
    else:
        messages = prompt_messages(formatting_func(row), where)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn is not the model's answer, so there is nothing to score")
    reference = messages[-1]["content"]
    if not isinstance(reference, str):
        reference = "".join(part.get("text", "") for part in reference)
    return messages[:-1], reference


def generate_answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, **media) -> str:
    """The model's greedy answer to `messages` (which may hold image and audio parts);
    `media`: max_soft_tokens / max_audio_seconds / mel_bins, as given to prepare_dataset."""
    return generate_replies(model, tokenizer, [messages], max_new_tokens=max_new_tokens, batch_size=1, **media)[0]


@dataclass
class Scores:
    """Held-out predictions, their references and the metrics over them."""

    predictions: list = field(default_factory=list)
    references: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def __str__(self) -> str:
        shown = ", ".join(f"{name.replace('_', ' ')} {value:.3f}" for name, value in self.metrics.items())
        return f"{len(self.references)} held-out rows: {shown}"


def score(model, tokenizer, rows, formatting_func=None, metrics=("exact_match", "character_error_rate"),
          max_new_tokens: int = 128, progress: bool = True, **media) -> Scores:
    """Generate an answer for every held-out row and score the answers against the rows' own.

    Args:
        model, tokenizer: as for chat.
        rows: a list of rows or a datasets.Dataset, in any schema prepare_dataset reads (the last
            model turn is the reference; the turns before it are the prompt).
        formatting_func: as for prepare_dataset (e.g. gemmatune.image_to_text(prompt)).
        metrics: names from METRICS: "exact_match", "character_error_rate", "word_error_rate".
        max_new_tokens: the longest answer. progress: print "scored i/n rows" as it goes.
        **media: max_soft_tokens / max_audio_seconds / mel_bins, as given to prepare_dataset.

    Returns:
        Scores: .predictions, .references and .metrics ({name: value}); str() is one line.

    Raises:
        ValueError: an unknown metric, or a row whose last turn is not the model's.
        MissingTowerError: rows with images or audio for a model loaded without that tower (before
            any row is answered).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}: choose from {', '.join(METRICS)}")
    result = Scores()
    if hasattr(rows, "features"):  # a datasets.Dataset: read image/audio columns undecoded, as prepare_dataset does
        rows = keep_media_encoded(rows)
    pairs = [prompt_and_reference(row, formatting_func, f"row {i}") for i, row in enumerate(rows, start=1)]
    require_towers(model, media_kinds(prompt for prompt, _ in pairs), "the rows")
    for i, (messages, reference) in enumerate(pairs, start=1):
        result.predictions.append(generate_answer(model, tokenizer, messages, max_new_tokens, **media))
        result.references.append(reference)
        if progress:
            print(f"\rscored {i}/{len(pairs)} rows", end="" if i < len(pairs) else "\n", flush=True)
    functions = {"exact_match": exact_match, "character_error_rate": character_error_rate,
                 "word_error_rate": word_error_rate}
    result.metrics = {name: functions[name](result.predictions, result.references) for name in metrics}
    return result


def image_table(images, columns: dict, max_height: int = 80):
    """An HTML table for Jupyter: one row per image, the image then one cell per column
    (e.g. {"reference": [...], "before": [...], "after": [...]}). Headers and cells align alike
    (left, top); an empty answer reads "(empty answer)", not an empty grey box."""
    import base64
    import html
    import io

    from IPython.display import HTML

    align = "text-align:left;vertical-align:top;padding:4px 12px 4px 0"

    def cell(value) -> str:
        text = "" if value is None else str(value)
        if not text.strip():
            return f"<td style='{align}'><i style='opacity:.6'>(empty answer)</i></td>"
        return f"<td style='{align}'><code>{html.escape(text)}</code></td>"

    header = "".join(f"<th style='{align}'>{html.escape(name)}</th>" for name in ["image", *columns])
    rows = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        cells = "".join(cell(values[i]) for values in columns.values())
        rows.append(f"<tr><td style='{align}'><img src='{src}' style='max-height:{max_height}px'></td>{cells}</tr>")
    return HTML(f"<table><tr>{header}</tr>{''.join(rows)}</table>")


def shorten(text: str, limit: int = 120) -> str:
    """One line of at most `limit` characters, for tables of answers."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
