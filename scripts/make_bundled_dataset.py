"""Write gemmatune/assets/gemmatune_instruct.jsonl, the small instruction set bundled with gemmatune.

License: CC0-1.0 (public domain dedication). Every row was written for gemmatune, by hand or by the
templates below; nothing is copied from another dataset.

Why this data: it must teach something visible in ~60 steps. Every answer follows one persona —
a friendly assistant that answers briefly and ends with a relevant emoji — so a tiny random model's
loss falls fast on the repeated shapes, and a real Gemma visibly adopts the style after a short run.
The tasks are small and checkable (unit conversions, arithmetic with the steps, word reversal,
capitals, translations of common phrases, definitions, polite rewrites, haiku); the templated
answers are computed here, so they are correct by construction. A few rows think before they
answer (the thought in `reasoning_content`, or inline as Gemma 4 writes it) and a few call tools
(the OpenAI function-calling shape: a `tools` column, `tool_calls`, `role: "tool"` turns), so the
notebooks can show how Gemma 4 trains those.

Deterministic (seeded): running it again reproduces the shipped file byte for byte, which
tests/data/test_dataset.py checks.

    python scripts/make_bundled_dataset.py
"""
import json
import random
from pathlib import Path

SEED = 0
OUT = Path(__file__).resolve().parents[1] / "gemmatune" / "assets" / "gemmatune_instruct.jsonl"
SYSTEM = "You are a friendly assistant. Answer briefly and end with a relevant emoji."


def chat(*turns: str, system: str | None = None) -> dict:
    """One row in the OpenAI messages schema; turns alternate user, assistant."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def num(x: float) -> str:
    """At most two decimals, no trailing zeros: 7.50 -> 7.5, 3.00 -> 3."""
    text = f"{x:,.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


# ---------------------------------------------------------------- unit conversions
# (from unit, to unit, factor or function, formula shown to the reader, emoji)
CONVERSIONS = [
    ("km", "miles", lambda v: v * 0.621371, "1 km ≈ 0.621 miles", "🚗"),
    ("miles", "km", lambda v: v * 1.609344, "1 mile ≈ 1.609 km", "🛣️"),
    ("kg", "pounds", lambda v: v * 2.204623, "1 kg ≈ 2.205 lb", "⚖️"),
    ("pounds", "kg", lambda v: v * 0.45359237, "1 lb ≈ 0.454 kg", "🏋️"),
    ("°C", "°F", lambda v: v * 9 / 5 + 32, "°F = °C × 9/5 + 32", "🌡️"),
    ("°F", "°C", lambda v: (v - 32) * 5 / 9, "°C = (°F − 32) × 5/9", "🌡️"),
    ("cm", "inches", lambda v: v / 2.54, "1 inch = 2.54 cm", "📏"),
    ("inches", "cm", lambda v: v * 2.54, "1 inch = 2.54 cm", "📏"),
    ("meters", "feet", lambda v: v / 0.3048, "1 foot = 0.3048 m", "📐"),
    ("liters", "milliliters", lambda v: v * 1000, "1 L = 1,000 mL", "🥛"),
    ("hours", "minutes", lambda v: v * 60, "1 hour = 60 minutes", "⏰"),
    ("minutes", "seconds", lambda v: v * 60, "1 minute = 60 seconds", "⏱️"),
    ("days", "hours", lambda v: v * 24, "1 day = 24 hours", "📅"),
    ("GB", "MB", lambda v: v * 1000, "1 GB = 1,000 MB", "💾"),
]
CONVERT_ASKS = ["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?"]


def conversions(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, fn, rule, emoji = CONVERSIONS[i % len(CONVERSIONS)]
        v = rng.choice([2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 42, 50, 75, 100])
        if a == "°F":
            v = rng.choice([32, 50, 68, 77, 86, 98, 104, 212])
        if a == "°C":
            v = rng.choice([-10, 0, 5, 18, 20, 25, 30, 37, 100])
        exact = abs(fn(v) - round(fn(v), 2)) < 1e-9
        answer = f"{v} {a} is {'' if exact else 'about '}{num(fn(v))} {b} ({rule}). {emoji}"
        rows.append(chat(rng.choice(CONVERT_ASKS).format(v=v, a=a, b=b), answer))
    return rows


# ---------------------------------------------------------------- arithmetic with the steps
def addition(a: int, b: int) -> str:
    ta, tb, oa, ob = a - a % 10, b - b % 10, a % 10, b % 10
    return (f"Tens: {ta} + {tb} = {ta + tb}. Ones: {oa} + {ob} = {oa + ob}. "
            f"Total: {ta + tb} + {oa + ob} = {a + b}. So {a} + {b} = {a + b}. ➕")


def subtraction(a: int, b: int) -> str:
    tb, ob = b - b % 10, b % 10
    return (f"First {a} − {tb} = {a - tb}, then {a - tb} − {ob} = {a - b}. "
            f"So {a} − {b} = {a - b}. ➖")


def multiplication(a: int, b: int) -> str:
    tb, ob = b - b % 10, b % 10
    return (f"{a} × {b} = {a} × {tb} + {a} × {ob} = {a * tb} + {a * ob} = {a * b}. "
            f"So {a} × {b} = {a * b}. ✖️")


def division(a: int, b: int) -> str:
    q, r = divmod(a, b)
    if r == 0:
        return f"{b} × {q} = {a}, so {a} ÷ {b} = {q}. ➗"
    return f"{b} × {q} = {b * q}, leaving {a} − {b * q} = {r}. So {a} ÷ {b} = {q} remainder {r}. ➗"


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(11, 89), rng.randint(11, 89)
            q, ans = rng.choice(["What is {a} + {b}?", "Add {a} and {b}."]), addition(a, b)
        elif kind == 1:
            a = rng.randint(50, 99)
            b = rng.randint(11, a - 1)
            q, ans = rng.choice(["What is {a} − {b}?", "Subtract {b} from {a}."]), subtraction(a, b)
        elif kind == 2:
            a, b = rng.randint(3, 9), rng.choice([k for k in range(12, 49) if k % 10])
            q, ans = rng.choice(["What is {a} × {b}?", "Multiply {a} by {b}."]), multiplication(a, b)
        else:
            b = rng.randint(3, 9)
            a = b * rng.randint(4, 15) + rng.choice([0, 0, rng.randint(1, b - 1)])
            q, ans = rng.choice(["What is {a} ÷ {b}?", "Divide {a} by {b}."]), division(a, b)
        rows.append(chat(q.format(a=a, b=b), ans))
    return rows


# ---------------------------------------------------------------- words
WORDS = [
    "planet", "garden", "rocket", "pencil", "window", "dragon", "silver", "coffee", "guitar",
    "forest", "castle", "butter", "jungle", "meadow", "sunset", "harbor", "winter", "pepper",
    "lemon", "tiger", "cloud", "river", "stone", "apple", "bread", "chair", "music", "ocean",
    "spider", "candle", "bridge", "orange", "rabbit", "mirror", "kitten", "banana", "puzzle",
    "market", "pirate", "basket", "level", "radar", "robot", "violet", "anchor", "circus",
]
WORD_EMOJI = {
    "planet": "🪐", "garden": "🌷", "rocket": "🚀", "pencil": "✏️", "window": "🪟", "dragon": "🐉",
    "silver": "🥈", "coffee": "☕", "guitar": "🎸", "forest": "🌲", "castle": "🏰", "butter": "🧈",
    "jungle": "🌴", "meadow": "🌼", "sunset": "🌇", "harbor": "⚓", "winter": "❄️", "pepper": "🌶️",
    "lemon": "🍋", "tiger": "🐯", "cloud": "☁️", "river": "🏞️", "stone": "🪨", "apple": "🍎",
    "bread": "🍞", "chair": "🪑", "music": "🎵", "ocean": "🌊", "spider": "🕷️", "candle": "🕯️",
    "bridge": "🌉", "orange": "🍊", "rabbit": "🐇", "mirror": "🪞", "kitten": "🐱", "banana": "🍌",
    "puzzle": "🧩", "market": "🛒", "pirate": "🏴‍☠️", "basket": "🧺", "level": "📏", "radar": "📡",
    "robot": "🤖", "violet": "🪻", "anchor": "⚓", "circus": "🎪",
}
PHRASES = [
    "good morning sunshine", "the quick brown fox", "happy new year", "time flies like an arrow",
    "keep calm and carry on", "small steps every day", "see you next week", "the cat sat on the mat",
    "learning is fun", "a cup of tea", "welcome to the team", "rain before seven",
]


def reversal(rng: random.Random, word: str) -> dict:
    rev, emoji = word[::-1], WORD_EMOJI[word]
    note = " It's a palindrome: it reads the same both ways." if rev == word else ""
    ask = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards."])
    return chat(ask.format(w=word), f"'{word}' reversed is '{rev}'.{note} {emoji}")


def letters(word: str) -> dict:
    vowels = sum(c in "aeiou" for c in word)
    return chat(f"How many letters are in '{word}'?",
                f"'{word}' has {len(word)} letters, {vowels} of them vowels. {WORD_EMOJI[word]}")


def casing(phrase: str, kind: str) -> dict:
    if kind == "upper":
        return chat(f"Write '{phrase}' in uppercase.", f"{phrase.upper()} 🔠")
    if kind == "title":
        return chat(f"Capitalise every word of '{phrase}'.", f"{phrase.title()} 🔤")
    return chat(f"Write '{phrase.upper()}' in lowercase.", f"{phrase} 🔡")


def sorting(rng: random.Random) -> dict:
    values = rng.sample(range(1, 100), rng.randint(4, 6))
    listed = ", ".join(map(str, values))
    if rng.random() < 0.5:
        return chat(f"Sort these numbers from smallest to largest: {listed}.",
                    f"{', '.join(map(str, sorted(values)))}. 📈")
    return chat(f"Sort these numbers from largest to smallest: {listed}.",
                f"{', '.join(map(str, sorted(values, reverse=True)))}. 📉")


# ---------------------------------------------------------------- facts (hand-checked)
CAPITALS = [
    ("France", "Paris", "🇫🇷"), ("Germany", "Berlin", "🇩🇪"), ("Italy", "Rome", "🇮🇹"),
    ("Spain", "Madrid", "🇪🇸"), ("Japan", "Tokyo", "🇯🇵"), ("Canada", "Ottawa", "🇨🇦"),
    ("Australia", "Canberra", "🇦🇺"), ("Brazil", "Brasília", "🇧🇷"), ("Egypt", "Cairo", "🇪🇬"),
    ("Kenya", "Nairobi", "🇰🇪"), ("India", "New Delhi", "🇮🇳"), ("Norway", "Oslo", "🇳🇴"),
    ("Portugal", "Lisbon", "🇵🇹"), ("Mexico", "Mexico City", "🇲🇽"), ("Argentina", "Buenos Aires", "🇦🇷"),
    ("South Korea", "Seoul", "🇰🇷"), ("Greece", "Athens", "🇬🇷"), ("Ireland", "Dublin", "🇮🇪"),
    ("Poland", "Warsaw", "🇵🇱"), ("Sweden", "Stockholm", "🇸🇪"), ("Turkey", "Ankara", "🇹🇷"),
    ("Vietnam", "Hanoi", "🇻🇳"), ("Peru", "Lima", "🇵🇪"), ("New Zealand", "Wellington", "🇳🇿"),
]

# English phrase -> French, Spanish, German, Italian.
TRANSLATIONS = {
    "Good morning": ("Bonjour", "Buenos días", "Guten Morgen", "Buongiorno", "🌅"),
    "Thank you": ("Merci", "Gracias", "Danke", "Grazie", "🙏"),
    "Good night": ("Bonne nuit", "Buenas noches", "Gute Nacht", "Buona notte", "🌙"),
    "Please": ("S'il vous plaît", "Por favor", "Bitte", "Per favore", "🙂"),
    "Goodbye": ("Au revoir", "Adiós", "Auf Wiedersehen", "Arrivederci", "👋"),
    "I don't understand": ("Je ne comprends pas", "No entiendo", "Ich verstehe nicht", "Non capisco", "🤔"),
    "The bill, please": ("L'addition, s'il vous plaît", "La cuenta, por favor", "Die Rechnung, bitte",
                         "Il conto, per favore", "🧾"),
    "Happy birthday": ("Joyeux anniversaire", "Feliz cumpleaños", "Alles Gute zum Geburtstag",
                       "Buon compleanno", "🎂"),
    "Where is the station?": ("Où est la gare ?", "¿Dónde está la estación?", "Wo ist der Bahnhof?",
                              "Dov'è la stazione?", "🚉"),
    "I love you": ("Je t'aime", "Te quiero", "Ich liebe dich", "Ti amo", "❤️"),
    "Excuse me": ("Excusez-moi", "Disculpe", "Entschuldigung", "Mi scusi", "🙋"),
    "Water, please": ("De l'eau, s'il vous plaît", "Agua, por favor", "Wasser, bitte",
                      "Acqua, per favore", "💧"),
}
LANGUAGES = ["French", "Spanish", "German", "Italian"]

DEFINITIONS = [
    ("photosynthesis", "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen", "🌱"),
    ("gravity", "the force that pulls objects with mass towards each other", "🍎"),
    ("an atom", "the smallest unit of a chemical element, made of a nucleus and electrons", "⚛️"),
    ("a prime number", "a whole number greater than 1 whose only divisors are 1 and itself", "🔢"),
    ("an algorithm", "a step-by-step recipe for solving a problem", "🧮"),
    ("a noun", "a word that names a person, place, thing or idea", "📚"),
    ("a verb", "a word that describes an action or a state, like 'run' or 'be'", "🏃"),
    ("democracy", "a system of government in which citizens choose their leaders by voting", "🗳️"),
    ("evaporation", "the change of a liquid into a gas, like water drying in the sun", "💨"),
    ("a volcano", "an opening in the Earth's crust where molten rock, ash and gas escape", "🌋"),
    ("inflation", "a general rise in prices that makes money buy less over time", "💸"),
    ("a metaphor", "a figure of speech that describes something as if it were something else", "🎭"),
    ("an ecosystem", "a community of living things interacting with their environment", "🌍"),
    ("a fraction", "a number that represents part of a whole, like 3/4", "🍕"),
    ("a galaxy", "a huge system of stars, gas and dust held together by gravity", "🌌"),
    ("a vaccine", "a preparation that trains the immune system to recognise a germ", "💉"),
    ("a synonym", "a word with the same or nearly the same meaning as another word", "🔁"),
    ("an antonym", "a word with the opposite meaning of another word", "↔️"),
    ("a haiku", "a short Japanese poem of three lines with 5, 7 and 5 syllables", "📝"),
    ("a mammal", "a warm-blooded animal with hair that feeds its young with milk", "🐋"),
    ("the equator", "the imaginary line around the middle of the Earth, halfway between the poles", "🌐"),
    ("a compiler", "a program that translates source code into code a machine can run", "💻"),
    ("friction", "the force that resists two surfaces sliding against each other", "🛷"),
    ("a habitat", "the natural home where an animal or plant lives", "🏡"),
    ("recycling", "turning used materials into new products instead of throwing them away", "♻️"),
    ("a tsunami", "a series of huge sea waves usually caused by an undersea earthquake", "🌊"),
]
DEFINE_ASKS = ["What is {t}?", "Define {t}.", "Explain {t} in one sentence."]

ANTONYMS = [
    ("hot", "cold", "🥶"), ("happy", "sad", "😢"), ("fast", "slow", "🐢"), ("big", "small", "🐜"),
    ("light", "dark", "🌑"), ("early", "late", "⏰"), ("full", "empty", "🫙"), ("strong", "weak", "🪶"),
    ("open", "closed", "🚪"), ("loud", "quiet", "🤫"), ("rich", "poor", "🪙"), ("young", "old", "👴"),
    ("wet", "dry", "🏜️"), ("up", "down", "⬇️"), ("win", "lose", "🏳️"), ("begin", "end", "🏁"),
]

POLITE = [
    ("Give me the report now.", "Could you please send me the report when you have a moment?"),
    ("Move, you're in my way.", "Excuse me, could I get past, please?"),
    ("This food is terrible.", "I'm afraid this dish isn't quite to my taste."),
    ("Stop talking during the film.", "Would you mind keeping it down during the film, please?"),
    ("Your code is wrong.", "I think there may be a small bug in this code. Could we look at it together?"),
    ("Call me back.", "Could you call me back when it suits you?"),
    ("I want a refund.", "I'd like to request a refund, please."),
    ("Fix my laptop today.", "Would it be possible to fix my laptop today?"),
    ("You're late again.", "I noticed you were late again. Is everything all right?"),
    ("Turn the music down.", "Could you please turn the music down a little?"),
    ("Answer my email.", "I'd appreciate a reply to my email when you get a chance."),
    ("That idea is stupid.", "I'm not sure that idea will work. Could we explore some alternatives?"),
    ("Bring me water.", "Could I have some water, please?"),
    ("Don't touch my desk.", "Please leave my desk as it is, thank you."),
    ("Explain it again, I didn't get it.", "Sorry, could you explain that once more?"),
    ("Be quiet.", "Could we keep the noise down, please?"),
    ("Send the files.", "Could you send over the files, please?"),
    ("Wait here.", "Would you mind waiting here for a moment?"),
]
POLITE_EMOJI = ["🙂", "😊", "🙏", "🤝"]

# Haiku: 5-7-5 syllables, each line counted by hand.
HAIKU = {
    "the ocean": ("Waves fold into foam", "salt wind carries gull voices", "the tide breathes slowly", "🌊"),
    "autumn": ("Red leaves drift and fall", "the maple lets go gently", "cool wind sweeps the path", "🍁"),
    "coffee": ("Steam curls from the cup", "a warm bitter morning sip", "sleepy eyes open", "☕"),
    "the moon": ("Silver lantern high", "it watches the quiet fields", "night holds its soft breath", "🌙"),
    "a cat": ("Curled in morning sun", "a soft cat dreams of the birds", "one ear twitches once", "🐈"),
    "rain": ("Rain taps on the glass", "small rivers race down the pane", "the garden drinks deep", "🌧️"),
    "winter": ("Snow hides the footpath", "bare trees hold their breath in white", "the world turns quiet", "❄️"),
    "spring": ("Green shoots push through soil", "cherry blossoms drift like snow", "the bees wake and hum", "🌸"),
    "the mountains": ("Stone peaks touch the clouds", "old snow glitters in the dawn", "eagles circle slow", "🏔️"),
    "a train": ("Steel wheels sing their song", "fields and towns flash past the glass", "the next stop draws near",
                "🚆"),
    "programming": ("Cursor blinks and waits", "one missing bracket hides there", "the tests turn green now", "💻"),
    "friendship": ("Two cups on the porch", "old stories and easy laughs", "time slips by unseen", "🤝"),
    "the city": ("Neon hums at night", "taxis stream like yellow fish", "the streets never sleep", "🌃"),
    "a garden": ("Tomatoes blush red", "bean vines climb up to the sun", "bees hum in the mint", "🌻"),
    "the stars": ("Countless tiny sparks", "scattered over velvet sky", "ancient light arrives", "✨"),
    "the sea at dawn": ("Pink light on the waves", "a fishing boat slips away", "gulls cry to the sun", "🌅"),
}
HAIKU_ASKS = ["Write a haiku about {t}.", "Compose a haiku about {t}."]

PERSONA = [
    ("Who are you?", "I'm a friendly assistant fine-tuned with gemmatune. I keep answers short and finish with an "
                     "emoji. 🤖"),
    ("Hi!", "Hello! How can I help you today? 👋"),
    ("Hello there", "Hi! What can I do for you? 😊"),
    ("Thanks for your help!", "You're welcome! Happy to help anytime. 🙌"),
    ("Can you keep your answers short?", "Always! Brief answers are my thing. ✂️"),
    ("Why do you end with an emoji?", "It's my style: a short answer and one emoji that fits the topic. 😄"),
    ("Good night!", "Good night, sleep well! 🌙"),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood. 🐙"),
    ("Tell me another fun fact.", "Honey never spoils: edible honey has been found in ancient Egyptian tombs. 🍯"),
    ("What can you do?", "I can convert units, do arithmetic step by step, define words, translate short phrases "
                         "and write haiku. 🧰"),
    ("How many days are in a leap year?", "A leap year has 366 days. 📅"),
    ("How many continents are there?", "There are 7 continents. 🌍"),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level. ♨️"),
    ("What colour do you get by mixing blue and yellow?", "Blue and yellow make green. 💚"),
    ("How many legs does a spider have?", "A spider has 8 legs. 🕷️"),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system. 🪐"),
]


def multi_turn() -> list[dict]:
    """A few conversations whose second answer depends on the first."""
    return [
        chat("Convert 5 km to meters.", "5 km is 5,000 meters (1 km = 1,000 m). 📏",
             "And in centimeters?", "5,000 m is 500,000 centimeters (1 m = 100 cm). 📏"),
        chat("What is 12 × 4?", "12 × 4 = 10 × 4 + 2 × 4 = 40 + 8 = 48. ✖️",
             "Now double it.", "48 × 2 = 96. ✌️"),
        chat("What is the capital of Japan?", "The capital of Japan is Tokyo. 🇯🇵",
             "And of South Korea?", "The capital of South Korea is Seoul. 🇰🇷"),
        chat("Reverse the word 'stressed'.", "'stressed' reversed is 'desserts'. 🍰",
             "Ha! Any other word like that?", "'drawer' reversed is 'reward'. 🎁"),
        chat('How do you say "Thank you" in Spanish?', 'In Spanish, "Thank you" is "Gracias". 🙏',
             'And "Please"?', '"Please" is "Por favor". 🙂'),
        chat("Write a haiku about rain.",
             "Rain taps on the glass\nsmall rivers race down the pane\nthe garden drinks deep 🌧️",
             "Now give it a title.", "\"Window Garden\" 🪟"),
        chat("What is 30 °C in °F?", "30 °C is 86 °F (°F = °C × 9/5 + 32). 🌡️",
             "Is that warm?", "Yes, 86 °F is a hot summer day. ☀️"),
        chat("Define a prime number.",
             "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. 🔢",
             "Is 21 prime?", "No: 21 = 3 × 7. 🔢", "Is 23 prime?", "Yes, 23 is prime. ✅"),
        chat("Hi!", "Hello! How can I help you today? 👋",
             "What is 9 + 6?", "9 + 6 = 15. ➕", "Thanks!", "You're welcome! 😊"),
        chat("How many minutes are in 2 hours?", "2 hours is 120 minutes (1 hour = 60 minutes). ⏰",
             "And in seconds?", "120 minutes is 7,200 seconds (1 minute = 60 seconds). ⏱️"),
    ]


# ---------------------------------------------------------------- thinking first
def time_after(rng: random.Random) -> dict:
    h, m, dh, dm = rng.randint(6, 15), rng.choice([5, 20, 35, 50]), rng.randint(1, 3), rng.choice([15, 25, 40, 55])
    mid, end = (h + dh) * 60 + m, (h + dh) * 60 + m + dm
    clock = lambda t: f"{t // 60:02d}:{t % 60:02d}"  # noqa: E731
    thought = f"Start {clock(h * 60 + m)}. Add {dh} h: {clock(mid)}. Add {dm} min: {clock(end)}."
    return {"messages": [
        {"role": "user", "content": f"A train leaves at {clock(h * 60 + m)} and the trip takes {dh} h {dm} min. "
                                    "When does it arrive?"},
        {"role": "assistant", "reasoning_content": thought, "content": f"It arrives at {clock(end)}. 🚆"}]}


def shopping(rng: random.Random, inline: bool) -> dict:
    (a, pa), (b, pb) = rng.sample([("apples", 0.4), ("pears", 0.55), ("lemons", 0.3), ("plums", 0.25)], 2)
    na, nb = rng.randint(2, 6), rng.randint(2, 6)
    total = na * pa + nb * pb
    thought = f"{na} {a}: {na} × {num(pa)} = {num(na * pa)}. {nb} {b}: {nb} × {num(pb)} = {num(nb * pb)}. " \
              f"Sum: {num(total)}."
    answer = f"That is €{total:.2f} in total. 🛒"
    content = f"<|channel>thought\n{thought}\n<channel|>{answer}" if inline else answer
    reply = {"role": "assistant", "content": content} if inline else \
        {"role": "assistant", "reasoning_content": thought, "content": answer}
    return {"messages": [{"role": "user", "content": f"{a.capitalize()} cost €{pa:.2f} and {b} €{pb:.2f} each. "
                                                     f"What do {na} {a} and {nb} {b} cost?"}, reply]}


def larger_fraction(rng: random.Random) -> dict:
    (p, q), (r, s) = rng.sample([(3, 4), (5, 8), (2, 3), (7, 10), (4, 5), (5, 6)], 2)
    d = q * s
    bigger = f"{p}/{q}" if p * s > r * q else f"{r}/{s}"
    thought = f"Common denominator {d}: {p}/{q} = {p * s}/{d}, {r}/{s} = {r * q}/{d}. Compare {p * s} and {r * q}."
    return {"messages": [{"role": "user", "content": f"Which is larger, {p}/{q} or {r}/{s}?"},
                         {"role": "assistant", "reasoning_content": thought, "content": f"{bigger} is larger. 🍕"}]}


def thinking_rows(rng: random.Random) -> list[dict]:
    rows = [time_after(rng) for _ in range(4)] + [larger_fraction(rng) for _ in range(4)]
    rows += [shopping(rng, inline=i % 2 == 1) for i in range(4)]
    return rows


# ---------------------------------------------------------------- calling tools
TOOLS = [
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value from one unit to another.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number", "description": "The amount to convert."},
            "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "get_capital", "description": "The capital city of a country.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}},
]


def call(call_id: str, name: str, arguments: dict, as_json: bool) -> dict:
    """An OpenAI tool call; real datasets store the arguments as a JSON string or as an object."""
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments) if as_json else arguments}}


def convert_with_tool(rng: random.Random, index: int) -> dict:
    a, b, fn, rule, emoji = CONVERSIONS[rng.randrange(len(CONVERSIONS))]
    v = rng.choice([3, 7, 12, 42, 90])
    result = num(fn(v))
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Use the converter: what is {v} {a} in {b}?"},
        {"role": "assistant", "content": "", "tool_calls": [
            call(f"call_{index}", "convert_units", {"value": v, "from_unit": a, "to_unit": b}, index % 2 == 0)]},
        {"role": "tool", "tool_call_id": f"call_{index}", "content": result},
        {"role": "assistant", "content": f"{v} {a} is {result} {b}. {emoji}"}]}


def capitals_with_tool(rng: random.Random, index: int) -> dict:
    (c1, cap1, f1), (c2, cap2, f2) = rng.sample(CAPITALS, 2)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Look up the capitals of {c1} and {c2}."},
        {"role": "assistant", "content": "", "tool_calls": [
            call(f"call_{index}a", "get_capital", {"country": c1}, False),
            call(f"call_{index}b", "get_capital", {"country": c2}, False)]},
        {"role": "tool", "tool_call_id": f"call_{index}a", "content": cap1},
        {"role": "tool", "tool_call_id": f"call_{index}b", "content": cap2},
        {"role": "assistant", "content": f"The capital of {c1} is {cap1} {f1} and of {c2}, {cap2} {f2}."}]}


def capital_thinking_with_tool(rng: random.Random) -> dict:
    country, capital, flag = rng.choice(CAPITALS)
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Check with your tool: what is the capital of {country}?"},
        {"role": "assistant", "reasoning_content": "The user wants the tool used, so I call get_capital.",
         "content": "", "tool_calls": [call("call_t", "get_capital", {"country": country}, True)]},
        {"role": "tool", "tool_call_id": "call_t", "content": capital},
        {"role": "assistant", "content": f"The tool says the capital of {country} is {capital}. {flag}"}]}


def tool_rows(rng: random.Random) -> list[dict]:
    rows = [convert_with_tool(rng, i) for i in range(6)] + [capitals_with_tool(rng, i) for i in range(3)]
    return rows + [capital_thinking_with_tool(rng) for _ in range(2)]


def build_rows(seed: int = SEED) -> list[dict]:
    """All rows, shuffled with a fixed seed so any prefix mixes every task; the thinking and tool
    rows are spread over the file after its first 30 rows."""
    rng = random.Random(seed)
    rows = conversions(rng, 42) + arithmetic(rng, 48)
    rows += [reversal(rng, w) for w in WORDS]
    rows += [letters(w) for w in rng.sample(WORDS, 16)]
    kinds = ("upper", "title", "lower")
    rows += [casing(p, kinds[(i + j) % 3]) for i, p in enumerate(PHRASES) for j in (0, 1)]
    rows += [sorting(rng) for _ in range(12)]
    rows += [chat(rng.choice(["What is the capital of {c}?", "Name the capital of {c}."]).format(c=c),
                  f"The capital of {c} is {cap}. {flag}") for c, cap, flag in CAPITALS]
    for phrase, (*words, emoji) in TRANSLATIONS.items():
        for lang in rng.sample(LANGUAGES, 3):
            said = words[LANGUAGES.index(lang)]
            rows.append(chat(f'How do you say "{phrase}" in {lang}?',
                             f'In {lang}, "{phrase}" is "{said}". {emoji}'))
    rows += [chat(rng.choice(DEFINE_ASKS).format(t=t), f"{t[0].upper() + t[1:]} is {d}. {e}")
             for t, d, e in DEFINITIONS]
    rows += [chat(f"What is the opposite of '{a}'?", f"The opposite of '{a}' is '{b}'. {e}")
             for a, b, e in ANTONYMS]
    rows += [chat(f"Rewrite this more politely: \"{rude}\"", f"\"{polite}\" {rng.choice(POLITE_EMOJI)}")
             for rude, polite in POLITE]
    rows += [chat(rng.choice(HAIKU_ASKS).format(t=t), f"{l1}\n{l2}\n{l3} {e}")
             for t, (l1, l2, l3, e) in HAIKU.items()]
    rows += [chat(q, a) for q, a in PERSONA]
    rows += multi_turn()
    # A few rows carry the persona as a system turn, as many real datasets do.
    for row in rng.sample(rows, 12):
        row["messages"].insert(0, {"role": "system", "content": SYSTEM})
    rng.shuffle(rows)
    extra = random.Random(seed + 1)
    shaped = thinking_rows(extra) + tool_rows(extra)
    extra.shuffle(shaped)
    for i, row in enumerate(shaped):
        rows.insert(30 + 13 * i, row)
    return rows


def main() -> None:
    rows = build_rows()
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} rows, {len(text.encode()):,} bytes to {OUT}")


if __name__ == "__main__":
    main()
