"""The 50 four-choice questions of bench/scoring.py's lm-evaluation-harness task, written deterministically
to bench/scoring_task/scoring_items.jsonl (committed; rerunning this rewrites the same bytes).

    python bench/scoring_items.py [--check]

Each line: {"id": int, "category": str, "question": str, "choices": [4 str], "answer": index of the
right choice}. Plain English: geography, arithmetic, common sense, opposites and science facts; the
right choice's position is shuffled with a fixed seed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH, "scoring_task", "scoring_items.jsonl")
SEED = 20240601

# (question, right answer, three wrong ones)
GEOGRAPHY = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Nagoya"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Naples", "Turin"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Frankfurt"]),
    ("What is the capital of Spain?", "Madrid", ["Barcelona", "Seville", "Valencia"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("What is the capital of Australia?", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("What is the capital of Egypt?", "Cairo", ["Alexandria", "Luxor", "Giza"]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean",
     ["the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean"]),
    ("On which continent is Brazil?", "South America", ["Africa", "Europe", "Asia"]),
    ("Which river flows through London?", "the Thames", ["the Seine", "the Danube", "the Rhine"]),
    ("What is the tallest mountain in the world?", "Mount Everest", ["Mont Blanc", "Mount Fuji", "Kilimanjaro"]),
]

COMMON_SENSE = [
    ("What do you use to cut paper?", "scissors", ["a spoon", "a pillow", "a cup"]),
    ("Where do fish live?", "in water", ["in trees", "in the desert", "in the sky"]),
    ("What do people usually drink when they are thirsty?", "water", ["sand", "paint", "oil"]),
    ("What do you wear on your feet?", "shoes", ["hats", "gloves", "scarves"]),
    ("When it rains, what do people open to stay dry?", "an umbrella", ["a book", "a window", "a box"]),
    ("What do you need to see in a dark room?", "a light", ["a fork", "a blanket", "a chair"]),
    ("Where do people usually sleep at night?", "in a bed", ["in a sink", "in an oven", "in a car wash"]),
    ("What do bees make?", "honey", ["milk", "bread", "cheese"]),
    ("What season comes after winter?", "spring", ["autumn", "summer", "winter"]),
    ("How many legs does a dog have?", "four", ["two", "six", "eight"]),
]

OPPOSITES = [
    ("hot", "cold", ["warm", "red", "fast"]),
    ("up", "down", ["over", "left", "high"]),
    ("big", "small", ["large", "tall", "wide"]),
    ("day", "night", ["morning", "sun", "week"]),
    ("happy", "sad", ["glad", "funny", "loud"]),
    ("open", "closed", ["wide", "empty", "new"]),
    ("fast", "slow", ["quick", "late", "far"]),
    ("old", "young", ["ancient", "tired", "short"]),
]

SCIENCE = [
    ("What gas do plants take in from the air to make food?", "carbon dioxide", ["helium", "neon", "argon"]),
    ("What is the closest star to the Earth?", "the Sun", ["Sirius", "Polaris", "Vega"]),
    ("At what temperature in degrees Celsius does water freeze?", "0", ["50", "100", "25"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What organ pumps blood through the human body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("How many days are there in a week?", "seven", ["five", "ten", "twelve"]),
    ("What is frozen water called?", "ice", ["steam", "fog", "rain"]),
    ("Which animal is known for having a very long neck?", "the giraffe",
     ["the rabbit", "the penguin", "the frog"]),
]


def arithmetic(rng: random.Random, count: int) -> list[tuple[str, str, list[str]]]:
    """Small sums, differences and products; the wrong answers are near misses (distinct, non-negative)."""
    out = []
    for i in range(count):
        kind = ("plus", "minus", "times")[i % 3]
        if kind == "plus":
            a, b = rng.randint(2, 49), rng.randint(2, 49)
            question, right = f"What is {a} plus {b}?", a + b
        elif kind == "minus":
            a = rng.randint(20, 99)
            b = rng.randint(2, a - 5)
            question, right = f"What is {a} minus {b}?", a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            question, right = f"What is {a} times {b}?", a * b
        wrong: list[int] = []
        for delta in rng.sample([-10, -2, -1, 1, 2, 10], 6):
            if len(wrong) < 3 and right + delta >= 0:
                wrong.append(right + delta)
        out.append((question, str(right), [str(w) for w in wrong]))
    return out


def items() -> list[dict]:
    rng = random.Random(SEED)
    groups = [("geography", GEOGRAPHY), ("arithmetic", arithmetic(rng, 12)), ("common sense", COMMON_SENSE),
              ("opposites", [(f"What is the opposite of \"{w}\"?", right, wrong) for w, right, wrong in OPPOSITES]),
              ("science", SCIENCE)]
    out = []
    for category, group in groups:
        for question, right, wrong in group:
            assert len(wrong) == 3 and len({right, *wrong}) == 4, question
            choices = [right, *wrong]
            rng.shuffle(choices)
            out.append({"id": len(out), "category": category, "question": question, "choices": choices,
                        "answer": choices.index(right)})
    assert len(out) == 50, len(out)
    return out


def render() -> str:
    return "".join(json.dumps(item, ensure_ascii=True) + "\n" for item in items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file differs from a fresh one")
    args = ap.parse_args()
    text = render()
    if args.check:
        with open(OUT) as f:
            same = f.read() == text
        print(f"{OUT}: {'up to date' if same else 'differs from bench/scoring_items.py'}")
        return 0 if same else 1
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT} ({text.count(chr(10))} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
