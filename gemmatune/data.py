"""Chat datasets -> Gemma 4 token ids with labels on the model turns only.

The path a row takes:

    row (ShareGPT / OpenAI messages / Alpaca)  --to_messages-->  [{"role", "content"}, ...]
    messages  --format_chat-->  "<bos><|turn>user\\n...<turn|>\\n<|turn>model\\n...<turn|>\\n"
    messages  --tokenize_conversation-->  input_ids + labels (-100 outside the answers)
    many rows --prepare_dataset-->  PreparedDataset (rows + counts for the notebook)  --collate-->  tensors

Rows with image or audio parts take the same path; gemmatune.multimodal_data adds what they need
(their placeholder runs, which never carry loss, and their pixels and features in `collate`).

Why the package renders Gemma 4's chat format itself: the official chat template lives only on the
model hub, and offline runs (CI, the tiny model) must produce the same text. `format_chat` matches
the template of `gemmatune.tiny.build_tiny_tokenizer()` exactly; the tests check it.

What is trained: each assistant turn's content and its closing `<turn|>` — the model must learn to
emit `<turn|>` to stop (it is one of Gemma 4's end-of-generation ids). Not trained: the prompt, the
`<|turn>model\\n` header (the prompt already supplies it at generation time), and the "\\n" after
`<turn|>`: generation stops at `<turn|>`, so that "\\n" is never generated, and training it would
only add an always-easy token to the loss.
"""
import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path

from gemmatune.errors import DatasetDownloadError, DatasetFormatError  # noqa: F401 (re-exported)
from gemmatune.media import MAX_AUDIO_SECONDS, ImageRef
from gemmatune.multimodal_data import (attach_row_media, check_no_media_tokens_in_text, collate_media,
                                       content_pieces, has_media, keep_media_encoded, media_run, media_settings,
                                       media_token_ids, plan_media)

BUNDLED_DATASET = Path(__file__).parent / "assets" / "gemmatune_instruct.jsonl"

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
BOS, TURN_START, TURN_END = "<bos>", "<|turn>", "<turn|>"
# Role names found in the common schemas, mapped to ours. Gemma calls the assistant "model".
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "system": "system"}
ACCEPTED_ROLES = "user/human, assistant/gpt/model, system"
PART_PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>"}  # the processor expands these
SKIP_HINT = "Fix the row, or pass skip_bad_rows=True to skip such rows (they are counted in the report)."


def bundled_dataset_path() -> Path:
    """The small instruction dataset shipped with gemmatune (works offline)."""
    return BUNDLED_DATASET


# ------------------------------------------------------------------ rows -> messages
def to_messages(row, where: str | None = None) -> list[dict]:
    """Convert one row of a common chat schema to [{"role": "system"|"user"|"assistant", "content"}].

    Why one function for three schemas: datasets on the hub come as ShareGPT (`conversations` with
    `from`/`value`), OpenAI (`messages` with `role`/`content`) or Alpaca (`instruction`, `input`,
    `output`), and users should not have to convert by hand. Content is a string; a list of
    {"type": "text", "text": ...} parts becomes one string (parts trimmed and concatenated, as
    Gemma's chat template does), and stays a list if it holds image or audio parts, for the
    multimodal notebooks. Anything else raises DatasetFormatError naming the row and the fix.
    `where` names the row in errors ("row 3", "line 7": prepare_dataset counts from 1).
    """
    where = where or "row"
    if not isinstance(row, dict):
        raise DatasetFormatError(f"{where}: expected a dict, got {type(row).__name__}. "
                                 "Each row must be a mapping of column name to value.", "not a dict")
    if row.get("messages") is not None:
        turns = row["messages"]
    elif row.get("conversations") is not None:
        turns = row["conversations"]
    elif row.get("instruction") is not None and row.get("output") is not None:
        return _alpaca_to_messages(row, where)
    else:
        raise DatasetFormatError(
            f"{where}: no 'conversations', 'messages' or 'instruction'/'output' columns "
            f"(found: {', '.join(map(str, row)) or 'nothing'}). "
            "Rename your columns or pass a formatting function (formatting_func=...).", "unknown columns")
    if not isinstance(turns, (list, tuple)):
        raise DatasetFormatError(f"{where}: the conversation is a {type(turns).__name__}, expected a list "
                                 "of turns ({'role': ..., 'content': ...} or {'from': ..., 'value': ...}).",
                                 "conversation not a list")
    if not turns:
        raise DatasetFormatError(f"{where}: the conversation is empty. Drop the row or fill it in.",
                                 "empty conversation")
    messages = [_turn_to_message(turn, i, where) for i, turn in enumerate(turns)]
    if messages[-1]["role"] != "assistant":
        raise DatasetFormatError(
            f"{where}: the last turn is from the {messages[-1]['role']}, not the assistant, so there "
            "is no answer to train on. End each conversation with an assistant turn, or drop the row.",
            "no answer turn")
    return messages


def _turn_to_message(turn, i: int, where: str) -> dict:
    """One turn, in either ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) keys."""
    if not isinstance(turn, dict):
        raise DatasetFormatError(f"{where}: turn {i} is a {type(turn).__name__}, expected a dict "
                                 "with 'role' and 'content' (or 'from' and 'value').", "bad turn")
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role is None:
        raise DatasetFormatError(f"{where}: turn {i} has no 'role' or 'from' key "
                                 f"(keys: {', '.join(turn)}).", "bad turn")
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise DatasetFormatError(f"{where}: turn {i} has unknown role {role!r}. Accepted roles: "
                                 f"{ACCEPTED_ROLES}. Map other roles with a formatting function.", "unknown role")
    role = ROLES[role.lower()]
    content = _normalise_content(content, f"{where}: turn {i} ({role})")
    if role == "assistant" and not (content.strip() if isinstance(content, str) else content):
        raise DatasetFormatError(f"{where}: turn {i} (assistant) is empty; an empty answer would teach "
                                 "the model to say nothing. Drop the row or fill in the answer.", "empty answer")
    return {"role": role, "content": content}


def _normalise_content(content, where: str):
    """A string stays; text-only part lists are joined; lists with image/audio parts stay lists."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise DatasetFormatError(
            f"{where}: content is {type(content).__name__}, expected a string or a list of "
            "{'type': 'text', 'text': ...} parts. Convert it to text, e.g. with a formatting function.",
            "bad content")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in PART_PLACEHOLDERS:
            parts.append(dict(part))
        else:
            raise DatasetFormatError(f"{where}: content part {part!r:.80} is not a text, image or audio "
                                     "part ({'type': 'text', 'text': ...}, {'type': 'image', ...}).", "bad content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"].strip() for p in parts)
    return parts


def _alpaca_to_messages(row: dict, where: str) -> list[dict]:
    """Alpaca: user = instruction (+ blank line + input when there is one), assistant = output."""
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise DatasetFormatError(f"{where}: '{name}' is {type(value).__name__}, expected a string.",
                                     "bad content")
    if not output.strip():
        raise DatasetFormatError(f"{where}: 'output' is empty, so there is no answer to train on. "
                                 "Drop the row or fill in the output.", "empty answer")
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


# ------------------------------------------------------------------ Gemma 4 chat format
def _role_name(role: str) -> str:
    """The name Gemma 4 writes after <|turn>: the assistant is "model"."""
    return "model" if role in ("assistant", "model") else role


def _render_content(content) -> str:
    """Content as the chat template writes it: trimmed text, image/audio parts as placeholders."""
    if isinstance(content, str):
        return content.strip()
    return "".join(p["text"].strip() if p["type"] == "text" else PART_PLACEHOLDERS[p["type"]]
                   for p in content)


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages in Gemma 4's chat format, e.g. for display or as a generation prompt.

    `<bos><|turn>user\\n{content}<turn|>\\n<|turn>model\\n{content}<turn|>\\n`; with
    add_generation_prompt the string ends with `<|turn>model\\n`, where the model's answer starts.
    Identical to the tiny tokenizer's chat template (tested), so no hub template is needed.
    """
    text = BOS + "".join(f"{TURN_START}{_role_name(m['role'])}\n{_render_content(m['content'])}{TURN_END}\n"
                         for m in messages)
    return text + (f"{TURN_START}model\n" if add_generation_prompt else "")


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_length: int,
                          train_on_inputs: bool = False, segment_cache: dict | None = None,
                          media_runs: list[list[int]] | None = None, media_ids: dict | None = None,
                          where: str = "row") -> dict:
    """dict(input_ids, labels, truncated, length, media_kept, cuts_media) for one conversation, cut
    to max_seq_length tokens (`length`: before the cut).

    Why segment by segment (header, content, `<turn|>`, "\\n"): the label mask then falls exactly on
    token boundaries, and an answer's tokens start fresh after `<|turn>model\\n` as in generation
    (for the tiny tokenizer the ids equal the whole string's; tested). Labels: see the module
    docstring; train_on_inputs=True trains all but <bos>. A processor works too (`.tokenizer` is used).
    segment_cache: one dict shared over rows of one tokenizer, so the fixed pieces are tokenised
    once (prepare_dataset does this; a tokenizer call costs ~0.15 ms).
    media_runs: the placeholder run of each image/audio part in order (multimodal_data.media_run);
    they are never trained. `media_kept` counts the runs that fit; `cuts_media` says that
    max_seq_length falls inside one (prepare_dataset then drops the row). With media_ids, a text
    part that tokenises to a media token raises DatasetFormatError naming `where`.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    input_ids, labels, cache = [], [], {} if segment_cache is None else segment_cache
    media_spans, runs = [], list(media_runs or [])

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def fixed(text: str) -> list[int]:  # the same in every row: tokenise once
        if text not in cache:
            cache[text] = encode(text)
        return cache[text]

    def add(ids: list[int], trained: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

    if tokenizer.bos_token_id is not None:  # added by hand: add_special_tokens differs per tokenizer
        add([tokenizer.bos_token_id], trained=False)
    for message in messages:
        answer = train_on_inputs or message["role"] in ("assistant", "model")
        add(fixed(f"{TURN_START}{_role_name(message['role'])}\n"), train_on_inputs)
        if media_runs is None or isinstance(message["content"], str):
            add(encode(_render_content(message["content"])), answer)
        else:
            for ids, is_media in content_pieces(message["content"], runs, encode):
                if is_media:
                    media_spans.append((len(input_ids), len(input_ids) + len(ids)))
                elif media_ids:
                    check_no_media_tokens_in_text(ids, media_ids, where)
                add(ids, answer and not is_media)
        add(fixed(TURN_END), answer)
        add(fixed("\n"), train_on_inputs)
    truncated = len(input_ids) > max_seq_length
    return {"input_ids": input_ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated,
            "length": len(input_ids), "media_kept": sum(end <= max_seq_length for _, end in media_spans),
            "cuts_media": any(start < max_seq_length < end for start, end in media_spans)}


# ------------------------------------------------------------------ datasets
@dataclass
class PreparedDataset:
    """Tokenised rows ({"input_ids", "labels"}) plus the counts the notebook prints."""

    examples: list[dict]
    max_seq_length: int
    truncated: list[bool] = field(default_factory=list)  # per example
    rows_dropped_long: int = 0  # longer than max_seq_length with drop_long=True
    rows_dropped_untrained: int = 0  # no trained token left after truncation
    rows_dropped_media_cut: int = 0  # max_seq_length fell inside an image's or a clip's tokens
    media_cut_length: int = 0  # the longest such row, in tokens: a max_seq_length that keeps them all
    rows_skipped: dict = field(default_factory=dict)  # reason -> count, with skip_bad_rows=True
    first_skipped: str = ""  # the first skipped row's error, so the reader sees an example

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


def _numbered_rows(data):
    """(where, row) pairs: where names the row in errors, counted from 1 ("line N" in a JSON Lines
    file, the file's own line number; "row N" elsewhere). A broken JSON line comes as its
    DatasetFormatError in place of the row, so the caller decides whether to skip it."""
    if isinstance(data, str) and data == "bundled":
        data = bundled_dataset_path()
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data={str(data)!r} is not a file. Pass data='bundled', a .json or "
                                    f".jsonl path, a list of rows, or load_hub_dataset({str(data)!r}).")
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path)
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}. "
                                     "Use a list, or JSON Lines (.jsonl) with one row a line.", "not a list")
    if isinstance(data, dict):  # a DatasetDict is a dict of splits
        raise DatasetFormatError(f"data is a dict with keys {', '.join(map(str, data))}: pass one split, "
                                 "e.g. data['train'], or a list of rows.", "not a list")
    for number, row in enumerate(keep_media_encoded(data), start=1):
        yield f"row {number}", row


def _read_jsonl(path: Path):
    """JSON Lines: (line N, row) for each non-blank line, N being the file's line number."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {number}", DatasetFormatError(f"{path} line {number}: not valid JSON ({exc.msg}).",
                                                           "not valid JSON")


def prepare_dataset(data, tokenizer, max_seq_length: int = 2048, train_on_inputs: bool = False,
                    drop_long: bool = False, formatting_func=None, skip_bad_rows: bool = False,
                    max_soft_tokens: int = 280, max_audio_seconds: float = MAX_AUDIO_SECONDS,
                    mel_bins: int | None = None, verify_media: bool = False) -> PreparedDataset:
    """Convert and tokenise every row; count what was truncated, dropped or skipped.

    `data`: "bundled", a path to .json/.jsonl, a datasets.Dataset, or a list of dict rows.
    `formatting_func(row)` may return a list of messages or a row in a supported schema, for
    columns `to_messages` does not know. drop_long=True drops rows over max_seq_length instead of
    truncating them (truncation can cut an answer mid-sentence). Rows with no trained token left
    are always dropped: they would cost compute and train nothing. A row that cannot be read
    raises DatasetFormatError naming it (rows and lines count from 1); skip_bad_rows=True skips
    such rows instead and counts them by reason in `report()`.

    Images and audio (parts {"type": "image", "image": PIL | path | bytes} and {"type": "audio",
    "audio": path | bytes | array, "sampling_rate": ...}; see gemmatune.multimodal_data): each image
    gets the soft tokens of a max_soft_tokens budget (70, 140, 280, 560 or 1120), each clip 25
    tokens a second, at most max_audio_seconds (30). mel_bins: the audio tower's input width (128;
    taken from a processor's feature extractor when one is passed). Relative media paths are read
    from the data file's folder. A missing, remote, corrupt, too long or too short medium is a bad
    row (reasons "missing image", "corrupt audio", ...); files are checked from their headers,
    and decoded once more with verify_media=True. A row that max_seq_length would cut inside a
    media run is dropped and counted (see report()).
    """
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length!r}: a row needs at least 2 tokens (<bos> and one "
                         "trained token); Gemma 4 rows are usually 256-4096 tokens long")
    base_dir = Path(data).parent if isinstance(data, (str, os.PathLike)) and data != "bundled" else None
    settings = media_settings(tokenizer, max_soft_tokens, max_audio_seconds, mel_bins, base_dir, verify_media)
    prepared, cache, ids = PreparedDataset(examples=[], max_seq_length=max_seq_length), {}, None
    for where, row in _numbered_rows(data):
        try:
            if isinstance(row, DatasetFormatError):
                raise row
            messages = _row_messages(row, where, formatting_func)
            media = plan_media(messages, where, settings) if has_media(messages) else []
            ids = ids or (media_token_ids(tokenizer) if media else None)  # read once, and only for media
            runs = [media_run(ref, ids) for ref in media] if media else None
            tokens = tokenize_conversation(tokenizer, messages, max_seq_length, train_on_inputs, cache, runs,
                                           ids if media else None, where)
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
            example = {"input_ids": tokens["input_ids"], "labels": tokens["labels"]}
            if media and tokens["media_kept"]:
                example.update(media=media[:tokens["media_kept"]], media_ids=ids)
            prepared.examples.append(example)
            prepared.truncated.append(tokens["truncated"])
    return prepared


def _row_messages(row, where: str, formatting_func) -> list[dict]:
    if formatting_func is not None:
        try:
            formatted = formatting_func(row)
        except DatasetFormatError as error:  # e.g. image_to_text's missing column: name the row
            raise DatasetFormatError(f"{where}: {error}", error.reason) from None
        row = {"messages": formatted} if isinstance(formatted, (list, tuple)) else formatted
    return attach_row_media(to_messages(row, where), row, where)


def load_hub_dataset(name: str, split: str = "train", **kwargs):
    """datasets.load_dataset, with an error that says what to do when offline."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, **kwargs)
    except Exception as exc:  # connection, auth and offline-mode errors come in many types
        raise DatasetDownloadError(
            f"could not download {name!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "No network, or the dataset needs a login? Use data='bundled' for the dataset shipped "
            "with gemmatune, or pass a local .json/.jsonl file.") from exc


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
                       **{"rows_skipped": dict(prepared.rows_skipped), **counts})

    return part(order[n_eval:], True), part(order[:n_eval], False)


# ------------------------------------------------------------------ batches and display
def collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad a list of examples into tensors: input_ids with pad, labels with -100, attention_mask.

    The length is rounded up to `pad_to_multiple_of`, so batches come in a few shapes (each
    shape is captured once as a CUDA graph, see gemmatune.graphs); the padding is masked out
    of the loss and, being on the right, never seen by a real token. When rows hold images or
    audio, their pixels and features are decoded now and added (multimodal_data.collate_media:
    pixel_values, image_position_ids, input_features, input_features_mask, mm_token_type_ids);
    a text-only batch has exactly the three keys above."""
    import torch

    if not batch:
        raise ValueError("collate got an empty batch")
    longest = max(len(ex["input_ids"]) for ex in batch)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(ex.get("media") for ex in batch):
        out.update(collate_media(batch, input_ids))
    return out


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
