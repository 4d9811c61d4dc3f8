"""prepare_dataset: every row through the data path, with counts of what was kept, cut and skipped.

    rows --numbered_rows--> (where, row) --row_to_messages--> messages
         --conversation_tokens (plan_media, tokenize_conversation)--> input_ids + labels + media refs
         ==> PreparedDataset  --collate--> tensors

Text rows take the same path (they have no media parts). The report says how many rows and tokens
there are, how many are trained, and why any row was truncated, dropped or skipped.

Any row costs bounded memory: its text is cut before it is tokenised (`bounded_tokens`), so a row
of gigabytes costs a few times max_seq_length tokens of work, while a row that fits keeps exactly
its tokens. `scan_rows` reads rows into messages without a tokenizer, so a command line can check
the data, and find which towers it needs, before a model is loaded.
"""
import os
import random
import re
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path

from gemmatune.data.audio import MAX_AUDIO_SECONDS
from gemmatune.data.batches import as_example, conversation_tokens, media_kinds
from gemmatune.data.chat_format import conversation_thinks
from gemmatune.data.images import ImageRef
from gemmatune.data.media import media_settings, plan_media
from gemmatune.data.messages import has_media, row_to_conversation
from gemmatune.data.rows import numbered_rows
from gemmatune.data.tokens import IGNORE_INDEX
from gemmatune.errors import DatasetFormatError

SKIP_HINT = "Fix the row, or pass skip_bad_rows=True to skip such rows (they are counted in the report)."
FIRST_CUT_CHARS_PER_TOKEN = 8  # the first cut keeps 8 characters per token of budget (English text has ~4)
CUT_MARGIN_TOKENS = 64  # a cut row keeps at least this many tokens past max_seq_length
WHITESPACE = re.compile(r"\s")


@dataclass
class PreparedDataset:
    """Tokenised rows ({"input_ids", "labels"}) plus the counts the notebook prints."""

    examples: list[dict]
    max_seq_length: int
    truncated: list[bool] = field(default_factory=list)  # per example
    thinking: list[bool] = field(default_factory=list)  # per example: a model turn carries a thought
    tool_use: list[bool] = field(default_factory=list)  # per example: the model calls tools
    rows_dropped_long: int = 0  # longer than max_seq_length with drop_long=True
    rows_dropped_untrained: int = 0  # no trained token left after truncation
    rows_dropped_media_cut: int = 0  # max_seq_length fell inside an image's or a clip's tokens
    media_cut_length: int = 0  # the longest such row, in tokens: a max_seq_length that keeps them all
    rows_skipped: dict = field(default_factory=dict)  # reason -> count, with skip_bad_rows=True
    first_skipped: str = ""  # the first skipped row's error, so the reader sees an example
    media_verified: bool = False  # every image and clip was decoded once (verify_media)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    rows = property(__len__)  # the number of rows kept

    @property
    def rows_truncated(self) -> int:
        return sum(self.truncated)

    @property
    def rows_dropped(self) -> int:
        return (self.rows_dropped_long + self.rows_dropped_untrained + self.rows_dropped_media_cut
                + sum(self.rows_skipped.values()))

    @property
    def total_tokens(self) -> int:
        return sum(len(ex["input_ids"]) for ex in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in self.examples)

    @property
    def rows_thinking(self) -> int:
        return sum(self.thinking)

    @property
    def rows_tool_use(self) -> int:
        return sum(self.tool_use)

    @property
    def media_counts(self) -> tuple[int, int]:
        """(images, audio clips) in the kept rows."""
        refs = [ref for ex in self.examples for ref in ex.get("media", ())]
        images = sum(isinstance(ref, ImageRef) for ref in refs)
        return images, len(refs) - images

    def report(self) -> str:
        """One line for the notebook: how much data, how much of it is trained, what was cut."""
        images, clips = self.media_counts
        kinds = [f"{n:,} {name}" for n, name in ((images, "images"), (clips, "audio clips")) if n]
        media = f" with {' and '.join(kinds)}" if kinds else ""
        shapes = [f"{n:,} {name}" for n, name in ((self.rows_thinking, "with a thought"),
                                                  (self.rows_tool_use, "calling tools")) if n]
        media += f" ({', '.join(shapes)})" if shapes else ""
        text = (f"{self.rows:,} rows{media}, {self.total_tokens:,} tokens ({self.trained_tokens:,} trained); "
                f"{self.rows_truncated:,} rows longer than {self.max_seq_length:,} tokens were truncated; "
                f"{self.rows_dropped:,} dropped")
        reasons = [(n, f"longer than {self.max_seq_length:,} tokens") for n in [self.rows_dropped_long] if n]
        reasons += [(n, "with no answer token left after truncation") for n in [self.rows_dropped_untrained] if n]
        reasons += [(n, f"that max_seq_length would cut inside an image or audio clip (max_seq_length="
                        f"{self.media_cut_length:,} keeps them)") for n in [self.rows_dropped_media_cut] if n]
        reasons += [(n, f"skipped: {reason}") for reason, n in sorted(self.rows_skipped.items())]
        if reasons:
            text += " (" + ", ".join(f"{n:,} {why}" for n, why in reasons) + ")"
        if self.first_skipped:
            text += f"; first skipped: {self.first_skipped}"
        return text


def prepare_dataset(data, tokenizer, max_seq_length: int = 2048, train_on_inputs: bool = False,
                    drop_long: bool = False, formatting_func=None, skip_bad_rows: bool = False,
                    max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                    mel_bins: int | None = None, verify_media: bool | None = None,
                    mask_thought: bool = False) -> PreparedDataset:
    """Every row through the data path: messages, media checked and counted, tokens and labels.

    Args:
        data: "bundled", a path to a .jsonl, .json, .csv or .parquet file (or a folder of them), a
            datasets.Dataset, or a list of dict rows in any schema gemmatune.data.messages reads
            (ShareGPT, OpenAI messages, Alpaca).
        tokenizer: the tokenizer (or processor) load_model returned.
        max_seq_length: longer rows are truncated (or dropped with drop_long=True); a row whose
            last answer token is cut away, or that would be cut inside an image or clip, is dropped
            and counted. A row's text is cut before tokenising, so a huge row costs little.
        train_on_inputs: train every token but <bos>, not only the answers.
        drop_long: drop rows over max_seq_length instead of truncating them.
        formatting_func: row -> messages (or a row in a known schema), for other columns;
            gemmatune.image_to_text / audio_to_text are ready-made ones.
        skip_bad_rows: skip unreadable rows (bad JSON, undecodable lines, broken media) and count
            them by reason instead of raising.
        max_soft_tokens: soft tokens per image (70, 140, 280, 560 or 1120).
        max_audio_seconds: the longest clip accepted (at most 30 s; 25 tokens a second).
        mel_bins: the audio tower's input width (default: the tokenizer's feature extractor, else 128).
        verify_media: decode every image and clip once now, not only their headers, so a file cut
            off after its header is found here and not by a training step. Default: on with
            skip_bad_rows=True (the row is then skipped and counted), else off.
        mask_thought: no loss on the model's thoughts (`<|channel>thought ...<channel|>`), only on
            its answers and tool calls. A row with a thought is rendered with thinking on.

    Returns:
        A PreparedDataset: rows of input_ids and labels (-100 outside the answers), media refs, and
        `report()`, one line of counts (rows, tokens, trained tokens, truncated, dropped, skipped).

    Raises:
        DatasetFormatError: a row that cannot be read (naming the row or line, counted from 1),
            unless skip_bad_rows=True.
        FileNotFoundError: `data` names no file.
        ValueError: max_seq_length below 2, an unknown soft-token budget, a clip limit over 30 s.
    """
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length!r}: a row needs at least 2 tokens (<bos> and one "
                         "trained token); Gemma 4 rows are usually 256-4096 tokens long")
    verify_media = skip_bad_rows if verify_media is None else verify_media
    settings = media_settings(tokenizer, max_soft_tokens, max_audio_seconds, mel_bins, _base_dir(data), verify_media)
    prepared, cache = PreparedDataset(examples=[], max_seq_length=max_seq_length), {}
    prepared.media_verified = verify_media
    for where, row in numbered_rows(data):
        try:
            if isinstance(row, DatasetFormatError):
                raise row
            messages, tools = row_to_conversation(row, where, formatting_func)
            tokens = bounded_tokens(messages, max_seq_length, lambda cut: conversation_tokens(
                tokenizer, cut, settings, where, max_seq_length, train_on_inputs, cache, tools=tools,
                mask_thought=mask_thought))
        except DatasetFormatError as error:
            if not skip_bad_rows:
                raise DatasetFormatError(f"{error} {SKIP_HINT}", error.reason) from None
            prepared.rows_skipped[error.reason] = prepared.rows_skipped.get(error.reason, 0) + 1
            prepared.first_skipped = prepared.first_skipped or str(error)
            continue
        if tokens["truncated"] and drop_long:
            prepared.rows_dropped_long += 1
        elif tokens["cuts_media"]:
            prepared.rows_dropped_media_cut += 1
            prepared.media_cut_length = max(prepared.media_cut_length, tokens["length"])
        elif all(label == IGNORE_INDEX for label in tokens["labels"]):
            prepared.rows_dropped_untrained += 1
        else:
            prepared.examples.append(as_example(tokens))
            prepared.truncated.append(tokens["truncated"])
            prepared.thinking.append(conversation_thinks(messages))
            prepared.tool_use.append(any(m.get("tool_calls") for m in messages))
    return prepared


def _base_dir(data) -> Path | None:
    """Where relative media paths of a data file (or a folder of files) are read from."""
    if not isinstance(data, (str, os.PathLike)) or data == "bundled":
        return None
    return Path(data) if Path(data).is_dir() else Path(data).parent


def bounded_tokens(messages: list[dict], max_seq_length: int, tokenize) -> dict:
    """tokenize(messages), with the text cut first so that a row of any size costs at most a few
    times max_seq_length tokens of work (a 10 MB row took 1.8 GB in the tokenizer; 3 GB aborted it).

    The first try keeps FIRST_CUT_CHARS_PER_TOKEN characters per token; a cut row that still has
    CUT_MARGIN_TOKENS tokens past max_seq_length is done (the kept tokens lie far before the cut,
    and the cut is at a whitespace boundary, so they are those of the whole row); one with fewer
    is tried again with 4x the characters, up to the whole row. So a row that fits is never cut:
    its tokens are exactly the uncut ones."""
    budget = FIRST_CUT_CHARS_PER_TOKEN * (max_seq_length + CUT_MARGIN_TOKENS)
    while True:
        cut = cut_conversation(messages, budget)
        tokens = tokenize(messages if cut is None else cut)
        if cut is None or tokens["length"] >= max_seq_length + CUT_MARGIN_TOKENS:
            return tokens
        budget *= 4


def cut_conversation(messages: list[dict], budget: int) -> list[dict] | None:
    """The conversation up to `budget` characters of text, cut at a whitespace boundary (within the
    last 1,000 characters, else exactly at the budget), everything after it dropped; None when the
    whole conversation is within the budget. Media parts before the cut are kept."""
    kept, left = [], budget
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        kept_parts = []
        for part in parts:
            if part["type"] != "text":
                kept_parts.append(part)
                continue
            text = part["text"]
            if len(text) > left:
                kept_parts.append({**part, "text": _cut_at_whitespace(text, left)})
                return kept + [{**message, "content": kept_parts if isinstance(content, list)
                                else kept_parts[0]["text"]}]
            kept_parts.append(part)
            left -= len(text)
        kept.append(message)
    return None


def _cut_at_whitespace(text: str, length: int) -> str:
    window_start = max(0, length - 1000)
    spaces = [m.start() for m in WHITESPACE.finditer(text, window_start, length)]
    return text[:spaces[-1] if spaces else length]


@dataclass
class RowScan:
    """What scan_rows found: rows read, the media kinds they hold, and the rows skipped."""

    rows: int = 0
    media_kinds: set = field(default_factory=set)  # {"image", "audio"}
    rows_skipped: dict = field(default_factory=dict)  # reason -> count
    first_skipped: str = ""

    def report(self) -> str:
        kinds = f" with {' and '.join(sorted(self.media_kinds))}" if self.media_kinds else " (text only)"
        skipped = sum(self.rows_skipped.values())
        return f"{self.rows:,} rows{kinds}" + (f", {skipped:,} unreadable (first: {self.first_skipped})"
                                                if skipped else "")


def scan_rows(data, formatting_func=None, skip_bad_rows: bool = False, max_soft_tokens: int = 280,
              max_audio_seconds: float = MAX_AUDIO_SECONDS) -> RowScan:
    """Read every row into messages and check its media headers, without a tokenizer or a model.

    Why: a command line can then refuse bad data, and pick the towers the data needs, before it
    spends a minute loading a model.

    Args:
        data, formatting_func, skip_bad_rows, max_soft_tokens, max_audio_seconds: as prepare_dataset.

    Returns:
        A RowScan: the rows read, the media kinds found ({"image", "audio"}), the rows skipped.

    Raises:
        DatasetFormatError: the first unreadable row (naming it), unless skip_bad_rows=True.
        FileNotFoundError: `data` names no file.
    """
    settings = media_settings(None, max_soft_tokens, max_audio_seconds, None, _base_dir(data))
    scan = RowScan()
    for where, row in numbered_rows(data):
        try:
            if isinstance(row, DatasetFormatError):
                raise row
            messages, _ = row_to_conversation(row, where, formatting_func)
            if has_media(messages):
                plan_media(messages, where, settings)
                scan.media_kinds |= media_kinds([messages])
        except DatasetFormatError as error:
            if not skip_bad_rows:
                raise DatasetFormatError(f"{error} {SKIP_HINT}", error.reason) from None
            scan.rows_skipped[error.reason] = scan.rows_skipped.get(error.reason, 0) + 1
            scan.first_skipped = scan.first_skipped or str(error)
            continue
        scan.rows += 1
    return scan


def split_train_eval(prepared: PreparedDataset, eval_fraction: float = 0.05, seed: int = 0):
    """Shuffle (seeded) and split into (train, eval); the drop counts stay with the train part."""
    order = list(range(len(prepared)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(1, round(len(order) * eval_fraction)))

    def part(indices, keep_counts):
        counts = {} if keep_counts else dict(rows_dropped_long=0, rows_dropped_untrained=0, rows_dropped_media_cut=0,
                                             media_cut_length=0, rows_skipped={}, first_skipped="")
        return replace(prepared, examples=[prepared.examples[i] for i in indices],
                       truncated=[prepared.truncated[i] for i in indices],
                       thinking=[prepared.thinking[i] for i in indices],
                       tool_use=[prepared.tool_use[i] for i in indices],
                       **{"rows_skipped": dict(prepared.rows_skipped), **counts})

    return part(order[n_eval:], True), part(order[:n_eval], False)


def show_example(prepared, tokenizer, index: int = 0) -> str:
    """What the model reads for one row, then only what the loss trains (labels != -100).

    Why: the reader should see with their own eyes that the prompts are masked and the answers,
    each ending in `<turn|>`, are what the model learns.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    ex = prepared[index]
    runs = groupby(zip(ex["input_ids"], ex["labels"]), key=lambda pair: pair[1] != IGNORE_INDEX)
    spans = [[token for token, _ in run] for is_trained, run in runs if is_trained]
    trained = sum(len(span) for span in spans)
    lines = [f"dataset[{index}]: {len(ex['input_ids'])} tokens, {trained} trained",
             "--- what the model reads ---", _shorten_runs(tokenizer.decode(ex["input_ids"])).rstrip("\n"),
             "--- what the loss trains (labels != -100) ---"]
    lines += [f"[{i}] {tokenizer.decode(span)}" for i, span in enumerate(spans, start=1)]
    return "\n".join(lines)


def _shorten_runs(text: str) -> str:
    """280 x <|image|> shown as "<|image|> x 280", so a row with an image stays readable."""
    return re.sub(r"((<\|image\|>|<\|audio\|>))(\2)+", lambda m: f"{m.group(2)} x {len(m.group(0)) // len(m.group(2))}",
                  text)
