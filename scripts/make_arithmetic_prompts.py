"""Write gemmatune/assets/arithmetic/{train,test}.jsonl, the prompts of the GRPO notebook.

License: CC0-1.0 (public domain dedication). Every prompt is made by the templates below; nothing
is copied from another dataset.

Why this task: a reinforcement-learning run needs a reward a person can check by hand. Each
prompt is a small calculation (an expression with operator precedence, a one-sentence word
problem, or a unit conversion) whose answer is one number, computed here, so it is correct by
construction; the prompt asks for the final answer on the last line as `Answer: <number>`, so
the reward is two plain checks: is the last line in that form (format), and is the number the
answer (correctness). The test split is held out: no prompt text occurs in both splits.

Deterministic (seeded): running it again reproduces the shipped files byte for byte, which
tests/training/test_grpo_data.py checks.

    python scripts/make_arithmetic_prompts.py
"""
import json
import random
from fractions import Fraction
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "gemmatune" / "assets" / "arithmetic"
SIZES = {"train": 800, "test": 100}
INSTRUCTION = "Give the final answer on the last line as: Answer: <number>"


def number(x: Fraction) -> str:
    """An exact answer as text: 210, 3.5, -12 (at most two decimals; the templates keep to that)."""
    if x.denominator == 1:
        return str(x.numerator)
    text = f"{float(x):.2f}".rstrip("0").rstrip(".")
    if Fraction(text) != x:
        raise ValueError(f"{x} has more than two decimals")
    return text


def expression(rng: random.Random) -> tuple[str, Fraction]:
    """Two or three operations with precedence or brackets; exact division only."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 15)
    shapes = [
        (f"{a} + {b} × {c}", a + b * c),
        (f"{a} × {c} − {b}", a * c - b),
        (f"({a} + {b}) × {c}", (a + b) * c),
        (f"({a} − {b}) × {c}", (a - b) * c),
        (f"{a * c} ÷ {c} + {b}", a + b),
        (f"{b} × {c} + {a} × 2", b * c + a * 2),
        (f"{a} − {b} + {c} × {c}", a - b + c * c),
    ]
    text, value = rng.choice(shapes)
    return f"What is {text}?", Fraction(value)


WORD_PROBLEMS = [
    ("A box holds {a} eggs. How many eggs are in {b} boxes and {c} loose eggs?", lambda a, b, c: a * b + c),
    ("A book has {a} pages per chapter and {b} chapters. You have read {c} pages. How many pages are left?",
     lambda a, b, c: a * b - c),
    ("{p} shares {ab} stickers equally among {b} friends. How many stickers does each friend get?",
     lambda a, b, c: a),
    ("A train travels at {a} km per hour for {b} hours, then {c} km more. How many km does it travel in all?",
     lambda a, b, c: a * b + c),
    ("{p} saves {a} coins a week for {b} weeks and then spends {c}. How many coins are left?",
     lambda a, b, c: a * b - c),
    ("A garden has {b} rows of {a} plants. {c} plants die. How many plants are left?", lambda a, b, c: a * b - c),
]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena"]


def word_problem(rng: random.Random) -> tuple[str, Fraction]:
    template, answer = rng.choice(WORD_PROBLEMS)
    a, b = rng.randint(3, 40), rng.randint(2, 12)
    c = rng.randint(1, a * b - 1)
    text = template.format(a=a, b=b, c=c, ab=a * b, p=rng.choice(NAMES))
    return text, Fraction(answer(a, b, c))


# (from unit, to unit, factor): exact factors, so the answers are exact
UNITS = [
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000), ("feet", "inches", 12), ("yards", "feet", 3), ("dozen", "items", 12),
]


def conversion(rng: random.Random) -> tuple[str, Fraction]:
    source, target, factor = rng.choice(UNITS)
    value = Fraction(rng.randint(2, 40)) + rng.choice([0, 0, Fraction(1, 2), Fraction(1, 4)])
    shown = number(value)
    ask = rng.choice(["How many {t} are in {v} {s}?", "Convert {v} {s} to {t}."])
    return ask.format(t=target, v=shown, s=source), value * factor


KINDS = {"arithmetic": expression, "word problem": word_problem, "unit conversion": conversion}


def make_rows(rng: random.Random, n: int, taken: set) -> list[dict]:
    rows, kinds = [], list(KINDS)
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        question, answer = KINDS[kind](rng)
        if question in taken:
            continue
        taken.add(question)
        rows.append({"prompt": f"{question}\n{INSTRUCTION}", "answer": number(answer), "kind": kind})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng, taken = random.Random(SEED), set()
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        rows = make_rows(rng, n, taken)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (OUT / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"wrote {n} prompts to {OUT / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
