"""Write gemmatune/assets/speech/: short English sentences spoken by espeak-ng, with their transcripts.

License: the sentences and this script are CC0-1.0 (written for gemmatune by the templates below).
The audio is the output of espeak-ng (GPL-3.0-or-later, voices included); the GPL covers the program,
not speech it synthesises from our text, so the clips are released CC0-1.0 as well.

Needs espeak-ng (Debian/Ubuntu: `apt-get install espeak-ng`), soundfile and soxr. CI and users do
not: the clips are committed. Each clip: espeak-ng's 22,050 Hz WAV, resampled to 16 kHz by soxr
(what Gemma 4's audio tower reads), stored as Ogg Opus (~4 KB a second; the set is ~1.5 MB).

Deterministic: the sentences, voices, speeds, file names and split come from a seeded generator,
and tests/data/test_media_rows.py checks that the shipped rows equal it. The audio is not checked
byte for byte: espeak-ng's and libopus' output can differ between versions and machines (meta.json
records the espeak-ng version used); the test checks that each clip decodes to 16 kHz mono of a
plausible length instead.

    python scripts/make_speech_dataset.py
"""
import io
import json
import random
import subprocess
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "gemmatune" / "assets" / "speech"
N_TRAIN, N_TEST = 120, 30
SAMPLING_RATE = 16_000

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"]
VARIANTS = ["m1", "m3", "m5", "f1", "f2", "f4"]
SPEEDS = [140, 150, 160, 170]  # words per minute
PITCHES = [35, 45, 55, 65]

ADJECTIVES = ["small", "quiet", "bright", "old", "happy", "yellow", "clever", "tired", "brave", "gentle"]
NOUNS = ["cat", "dog", "farmer", "teacher", "robot", "child", "bird", "sailor", "doctor", "horse"]
VERBS = ["walks", "runs", "sings", "waits", "reads", "sleeps", "works", "dances", "looks", "jumps"]
PLACES = ["the river", "the garden", "the station", "the old bridge", "the market", "the hill", "the library",
          "the kitchen", "the harbour", "the forest"]
PREPOSITIONS = ["near", "behind", "across", "inside", "beside", "under"]
TIMES = ["every morning", "after lunch", "at night", "on Sunday", "in the spring", "before dinner"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
THINGS = ["apples", "books", "letters", "chairs", "candles", "boxes", "stamps", "shells"]
COLOURS = ["red", "blue", "green", "white", "black", "orange"]

SENTENCES = [
    "Please close the window before you leave.", "The train to the city is late again.",
    "Turn left at the next corner.", "Could you pass me the salt?", "It is going to rain this afternoon.",
    "My phone battery is almost empty.", "We planted tomatoes in the garden.", "The meeting starts at nine.",
    "She painted the fence bright blue.", "The coffee is too hot to drink.", "He forgot his umbrella at home.",
    "The museum is closed on Monday.", "Write your name at the top of the page.", "The baby is finally asleep.",
    "This soup needs a little more pepper.", "The library opens at ten.", "Our flight leaves in two hours.",
    "The river froze during the winter.", "I would like a cup of tea.", "The children are playing outside.",
    "Keep the receipt in case you need it.", "The wind blew the leaves away.", "Dinner is ready in five minutes.",
    "The shop sells fresh bread every day.", "Please speak a little more slowly.", "The old clock stopped at noon.",
    "We walked along the beach at sunset.", "The door is open, come in.", "The printer is out of paper.",
    "Thank you for your help today.",
]


def templated(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        words = (rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PREPOSITIONS),
                 rng.choice(PLACES))
        return "The " + " ".join(words) + "."
    if kind == 1:
        words = (rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PREPOSITIONS), rng.choice(PLACES), rng.choice(TIMES))
        return "The " + " ".join(words) + "."
    if kind == 2:
        return f"There are {rng.choice(NUMBERS)} {rng.choice(COLOURS)} {rng.choice(THINGS)} on the table."
    noun = rng.choice(NOUNS)
    plural = "children" if noun == "child" else noun + "s"
    return f"I saw {rng.choice(NUMBERS)} {plural} {rng.choice(PREPOSITIONS)} {rng.choice(PLACES)} {rng.choice(TIMES)}."


def build_rows(seed: int = SEED) -> list[dict]:
    """Unique sentences with a voice each, shuffled; the last N_TEST are held out."""
    rng = random.Random(seed)
    sentences, seen = [], set()
    for sentence in SENTENCES + [templated(rng) for _ in range(4 * (N_TRAIN + N_TEST))]:
        if sentence not in seen and len(sentences) < N_TRAIN + N_TEST:
            seen.add(sentence)
            sentences.append(sentence)
    rng.shuffle(sentences)
    rows = []
    for i, text in enumerate(sentences):
        split = "train" if i < N_TRAIN else "test"
        voice = {"voice": f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}", "speed": rng.choice(SPEEDS),
                 "pitch": rng.choice(PITCHES)}
        rows.append({"audio": f"{split}_{i:03d}.ogg", "text": text, "split": split, **voice})
    return rows


def synthesise(text: str, voice: str, speed: int, pitch: int):
    """espeak-ng's speech for text, as float32 mono at 16 kHz."""
    import numpy as np
    import soundfile
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(samples, rate, SAMPLING_RATE).astype(np.float32)


def rows_for_split(rows: list[dict], split: str) -> list[dict]:
    """What {split}.jsonl holds: the dataset's columns only (as in LibriSpeech: audio, text)."""
    return [{"audio": row["audio"], "text": row["text"]} for row in rows if row["split"] == split]


def main() -> None:
    import soundfile

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.ogg"):
        old.unlink()
    rows = build_rows()
    for row in rows:
        samples = synthesise(row["text"], row["voice"], row["speed"], row["pitch"])
        soundfile.write(OUT / row["audio"], samples, SAMPLING_RATE, format="OGG", subtype="OPUS")
    for split in ("train", "test"):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_for_split(rows, split))
        (OUT / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    version = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.split()
    meta = {"espeak-ng": version[version.index("text-to-speech:") + 1], "seed": SEED, "sampling_rate": SAMPLING_RATE}
    (OUT / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(rows)} clips ({N_TRAIN} train, {N_TEST} test), {size:,} bytes to {OUT}")


if __name__ == "__main__":
    main()
