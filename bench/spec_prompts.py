"""Grounded prompts for bench/speculative.py: ask the model to copy a passage of plain English prose.

A passage is a run of consecutive sentences (about 150-170 tokens) of one of two short stories, its
names, places and details drawn with a fixed seed. What makes SmolLM2-135M-Instruct copy rather than
rewrite (tried on the bundled model, greedy): a coherent story rather than unrelated sentences
(stdlib docstring paragraphs mostly got paraphrased or explained), conventional punctuation (it "fixes"
missing commas), a system prompt that asks for exact copies, and passages under ~200 tokens (longer
ones mostly drift into paraphrase or loops).
"""
from __future__ import annotations

import random

SYSTEM = ("You are a precise copying assistant. When asked to copy a text, you reply with exactly the same text, "
          "word for word, and nothing else.")
INSTRUCTIONS = ("Copy the following text:\n\n{p}", "Copy this text exactly, word for word:\n\n{p}")
WOMEN = ["Anna", "Maria", "Lena", "Sofia", "Clara", "Emma", "Nora", "Rosa", "Ida", "Alice"]
MEN = ["Tom", "David", "Omar", "Peter", "Jonas", "Hugo", "Felix", "Samuel", "Victor", "Leo"]
FILL = dict(
    town=["a small fishing village", "a quiet mountain town", "a busy river port", "an old market town",
          "a village at the edge of a forest", "a windy island", "a town surrounded by vineyards"],
    job=["baker", "carpenter", "teacher", "doctor", "gardener", "librarian", "painter", "tailor", "farmer"],
    animal=["dog", "cat", "horse", "goat", "donkey"],
    food=["fresh bread", "apple pie", "vegetable soup", "roasted chestnuts", "honey cakes", "grilled fish"],
    season=["spring", "summer", "autumn", "winter"],
    city=["the capital", "the city by the sea", "the old university town", "the big city in the south"],
    color=["red", "green", "blue", "yellow"],
)
STORIES = [[  # a journey
    "{name} lived in {town} with an old {animal} and a garden full of flowers.",
    "Every morning, {name} woke up before sunrise and opened the windows to let in the fresh air.",
    "{name} worked as a {job}, and most people in the town knew {him} by name.",
    "On most days, {name} walked to work along the narrow road that ran past the church and the school.",
    "{His} best friend, {friend}, lived in the house across the street and often came over for tea.",
    "One morning in {season}, a letter arrived from a cousin who lived far away in {city}.",
    "The cousin asked {name} to visit before the end of {season}, and {name} read the letter twice.",
    "That evening, {name} wrote a list of things to do and pinned it to the kitchen wall.",
    "The next morning, {name} packed a bag, locked the door, and left the key with {friend}.",
    "The train to {city} left at seven o'clock and stopped at every small station along the way.",
    "Through the window, {name} saw fields, forests, and a lake that shone like silver in the morning light.",
    "The cousin was waiting on the platform with a big smile and a {color} umbrella.",
    "They spent the afternoon walking through the parks and the museums of the city.",
    "In the evening, they ate dinner in a small restaurant where the owner sang old songs.",
    "After three days, {name} began to miss the quiet streets and the sound of the river at home.",
    "When {name} came back, the {animal} ran to the gate and would not stop jumping with joy.",
    "{friend} had watered the flowers every day, and the garden looked even better than before.",
    "That night, {name} sat by the fire and wrote a long letter to thank the cousin for the visit.",
    "Years later, people in the town still told the story of that {season} and the long journey to {city}.",
], [  # a festival
    "Every year at the end of {season}, the people of {town} held a festival in the main square.",
    "Weeks before the festival, {name} and {friend} began to plan what they would bring.",
    "{name} was a {job}, but everyone knew that {he} was also the best cook in the street.",
    "This year, {he} decided to make {food} from an old recipe that {his} grandmother had written down.",
    "{friend} promised to paint a large sign in {color} letters to hang above the tables.",
    "On the morning of the festival, the square was full of people carrying chairs, flowers, and baskets.",
    "Musicians came from the villages nearby, and children ran between the stalls with paper flags.",
    "{name} set up a long table under the old chestnut tree and covered it with a white cloth.",
    "By noon, the smell of {food} had filled the whole square, and a line of hungry people had formed.",
    "An old man tasted the food and said that it reminded him of the festivals of his childhood.",
    "In the afternoon, there was a race for the children and a competition for the best garden.",
    "{friend} won a small prize for the sign, and everyone cheered when the mayor gave it to {friend_him}.",
    "When the sun went down, lanterns were lit along the streets, and the music grew louder.",
    "People danced in the square until late in the night, and nobody wanted to go home.",
    "At midnight, the bells of the church rang, and the festival came slowly to an end.",
    "The next morning, {name} and {friend} helped to clean the square and to carry the tables back.",
    "They agreed that it had been the best festival that the town had seen in many years.",
    "On the way home, {name} was already thinking about what to cook the following year.",
]]


def passage(rng: random.Random, count, lo: int) -> str:
    """Consecutive sentences of a story, from one in its first half, until they hold `count` >= lo tokens."""
    woman, friend_woman = rng.random() < 0.5, rng.random() < 0.5
    name = rng.choice(WOMEN if woman else MEN)
    v = {k: rng.choice(options) for k, options in FILL.items()}
    v.update(name=name, friend=rng.choice([x for x in (WOMEN if friend_woman else MEN) if x != name]),
             he="she" if woman else "he", him="her" if woman else "him", His="Her" if woman else "His",
             his="her" if woman else "his", friend_him="her" if friend_woman else "him")
    story = rng.choice(STORIES)
    # from a sentence that needs none before it and names a drawn detail early (prompts share few prefixes)
    starts = [i for i in range(len(story) // 2)
              if "{" in story[i][:40] and not story[i].startswith(("{His}", "{he}", "They", "This year"))]
    out, n = [], 0
    for s in story[rng.choice(starts):]:
        if n >= lo:
            break
        out.append(s.format(**v))
        n += count(" " + out[-1])
    return " ".join(out)


def grounded_prompts(tokenizer, count: int, seed: int = 0, lo: tuple[int, int] = (150, 170)) -> list[dict]:
    """`count` copy prompts: {"prompt" (the user message), "body" (the request's messages, system prompt
    included), "passage", "passage_tokens", "max_tokens" (the passage's length + 32)}."""
    rng = random.Random(seed)

    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    out = []
    for k in range(count):
        p = passage(rng, tokens, rng.randint(*lo))
        user = INSTRUCTIONS[k % len(INSTRUCTIONS)].format(p=p)
        n = tokens(p)
        out.append({"prompt": user, "body": {"messages": [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": user}]},
                    "passage": p, "passage_tokens": n, "max_tokens": n + 32})
    return out
