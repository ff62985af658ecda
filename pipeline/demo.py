"""The built-in demo task: a small world of stories, generated deterministically from a seed, with
data for every stage (corpus, demonstrations, preference pairs, held-out prompts) and a gold judge.

The gold judge (`gold_score`) plays the human rater: it is never used for training, only to measure
whether a stage made the model better.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

GIRLS = ["Mia", "Lily", "Anna", "Zoe", "Emma", "Ella", "Nora", "Ruby", "Lucy", "Ava"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn", "Owen", "Noah", "Eli"]
PEOPLE = GIRLS + BOYS
ANIMALS = ["cat", "dog", "rabbit", "fox", "owl", "duck", "horse", "frog", "bear", "mouse", "goat", "bird"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"]
PLACES = ["park", "forest", "beach", "garden", "farm", "river", "village", "hill", "lake", "market"]
OBJECTS = ["ball", "kite", "hat", "box", "book", "boat", "cake", "lamp", "drum", "key", "cup", "bell"]
FEELINGS = ["happy", "sad"]
VOCAB = {"person": PEOPLE, "animal": ANIMALS, "colour": COLOURS, "obj": OBJECTS, "place": PLACES, "ending": FEELINGS}
POSITIVE_WORDS = ["loved", "liked", "enjoyed", "wonderful", "great", "fun", "happy", "smiled"]
NEGATIVE_WORDS = ["hated", "broke", "lost", "awful", "scared", "angry", "sad", "cried"]

# Each task's share of demonstrations, preference pairs and prompts.
TASKS = ("story", "qa", "sentiment", "summary")
MAX_WORDS = {"story": 90, "qa": 14, "sentiment": 4, "summary": 30}


@dataclass(frozen=True)
class Story:
    person: str
    animal: str
    colour: str
    obj: str
    place: str
    ending: str  # "happy" | "sad"
    variant: int  # picks the sentence templates

    @property
    def pronoun(self) -> str:
        return "She" if self.person in GIRLS else "He"

    @property
    def possessive(self) -> str:
        return "her" if self.person in GIRLS else "his"


def sample_story(rng: random.Random) -> Story:
    return Story(rng.choice(PEOPLE), rng.choice(ANIMALS), rng.choice(COLOURS), rng.choice(OBJECTS),
                 rng.choice(PLACES), rng.choice(FEELINGS), rng.randrange(1 << 30))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render_story(s: Story) -> str:
    """A short story mentioning each of the story's elements exactly once as its kind of word."""
    rng = random.Random(s.variant)
    kind = "girl" if s.person in GIRLS else "boy"
    p, a, c, o, pl = s.person, s.animal, s.colour, s.obj, s.place
    an_a, an_c = article(a), article(c)
    opening = rng.choice([
        f"Once upon a time, there was a little {kind} named {p}.",
        f"{p} was a little {kind} who liked to play outside.",
        f"There once was a {kind} called {p}.",
    ])
    thing = rng.choice([
        f"{p} had {an_c} {c} {o}.",
        f"{s.pronoun} had {an_c} {c} {o} that {s.pronoun.lower()} took everywhere.",
        f"One morning, {p} found {an_c} {c} {o}.",
    ])
    meet = rng.choice([
        f"One day, {p} went to the {pl} and met {an_a} {a}.",
        f"Then {p} went to the {pl}, where {an_a} {a} was playing.",
        f"At the {pl}, {p} saw a small {a}.",
    ])
    middle = rng.choice([
        "The sun was warm and the sky was clear.",
        "The wind was soft and the day was long.",
        "It was a quiet day.",
        "",
    ])
    if s.ending == "happy":
        event = rng.choice([
            f"The {a} wanted to play with the {o}.",
            f"The {a} helped {p} carry the {o}.",
            f"{p} showed the {o} to the {a}.",
        ])
        end = rng.choice([
            f"They played together all day, and {p} was very happy.",
            f"{p} smiled and was happy to have a new friend.",
            f"In the end, {p} and the {a} were happy.",
        ])
    else:
        event = rng.choice([
            f"The {a} ran away with the {o}.",
            f"The {a} pushed the {o} into the water.",
            f"{p} dropped the {o} and the {a} stepped on it.",
        ])
        end = rng.choice([
            f"{p} was sad and went home alone.",
            f"{p} cried, and the day was not fun anymore.",
            f"In the end, {p} felt sad.",
        ])
    return " ".join(x for x in (opening, thing, meet, middle, event, end) if x)


def find_story_elements(text: str) -> dict[str, str | None]:
    """Read a story's person, animal, place, colour, object and ending back from its text."""
    words = re.findall(r"[A-Za-z]+", text)
    lower = [w.lower() for w in words]

    def first(vocab):
        return next((w for w in words if w in vocab or w.lower() in vocab), None)

    colour = obj = None
    for w, nxt in zip(lower, lower[1:]):
        if w in COLOURS and nxt in OBJECTS:
            colour, obj = w, nxt
            break
    person = first(PEOPLE)
    animal = first(ANIMALS)
    place = first(PLACES)
    ending = "sad" if {"sad", "cried"} & set(lower) else "happy" if {"happy", "smiled"} & set(lower) else None
    return {"person": person, "animal": animal and animal.lower(), "place": place and place.lower(),
            "colour": colour, "obj": obj, "ending": ending}


# ---------------------------------------------------------------------------------------------
# Prompts and responses for the four tasks
# ---------------------------------------------------------------------------------------------

QA_QUESTIONS = {
    "colour": "What colour was the {obj}?",
    "place": "Where did {person} go?",
    "animal": "Which animal did {person} meet?",
    "ending": "How did {person} feel at the end?",
}


def _sentiment_sentence(rng: random.Random, s: Story, label: str) -> str:
    if label == "positive":
        return rng.choice([
            f"{s.person} loved the {s.colour} {s.obj}.",
            f"The day at the {s.place} was wonderful.",
            f"{s.person} enjoyed playing with the {s.animal}.",
            f"It was fun to fly the {s.obj} with the {s.animal}.",
        ])
    return rng.choice([
        f"{s.person} hated the {s.colour} {s.obj}.",
        f"The {s.obj} broke and {s.person} cried.",
        f"The day at the {s.place} was awful.",
        f"The {s.animal} was scared and angry.",
    ])


def make_prompt(rng: random.Random, task: str) -> tuple[str, str]:
    """A (prompt, correct response) pair for one task."""
    s = sample_story(rng)
    if task == "story":
        prompt = (f"Write a short story about {s.person}, {article(s.animal)} {s.animal} "
                  f"and {article(s.colour)} {s.colour} {s.obj}.")
        return prompt, render_story(s)
    story = render_story(s)
    if task == "qa":
        kind = rng.choice(list(QA_QUESTIONS))
        question = QA_QUESTIONS[kind].format(obj=s.obj, person=s.person)
        prompt = f"Read the story and answer the question.\n\n{story}\n\nQuestion: {question}"
        answer = {"colour": f"The {s.obj} was {s.colour}.", "place": f"{s.person} went to the {s.place}.",
                  "animal": f"{s.person} met {article(s.animal)} {s.animal}.", "ending": f"{s.person} felt {s.ending}."}[kind]
        return prompt, answer
    if task == "sentiment":
        label = rng.choice(["positive", "negative"])
        prompt = f"Is this sentence positive or negative?\n\n{_sentiment_sentence(rng, s, label)}"
        return prompt, label.capitalize() + "."
    if task == "summary":
        prompt = f"Summarize the story in one sentence.\n\n{story}"
        outcome = "had a happy day" if s.ending == "happy" else "ended the day sad"
        return prompt, (f"{s.person} took {article(s.colour)} {s.colour} {s.obj} to the {s.place}, "
                        f"met {article(s.animal)} {s.animal} and {outcome}.")
    raise ValueError(f"unknown demo task {task!r}; expected one of {TASKS}")


def _swap(word: str, vocab: list[str], rng: random.Random) -> str:
    return rng.choice([w for w in vocab if w != word])


def make_flawed(rng: random.Random, prompt: str, response: str) -> str:
    """A realistic flaw of a correct response: a wrong element or answer, rambling, or no ending."""
    task = task_of(prompt)
    kind = rng.choice(["wrong", "wrong", "ramble"])
    if kind == "ramble":
        sentences = re.findall(r"[^.!?]+[.!?]", response)
        extra = " ".join(rng.choice(sentences).strip() for _ in range(rng.randint(2, 3)))
        if task == "story":
            return response + " " + extra + " And then"
        return response + " " + extra + " " + response
    if task == "sentiment":
        return "Negative." if response.startswith("Positive") else "Positive."
    # swap an element the prompt asked for, so that the flaw is a real mistake
    keys = {"story": ("person", "animal", "colour"), "summary": ("person", "place", "animal", "obj"),
            "qa": ("colour", "place", "animal", "ending")}[task]
    present = [k for k in keys for w in VOCAB[k] if _mentions(response, w)]
    if present:
        key = rng.choice(present)
        word = next(w for w in VOCAB[key] if _mentions(response, w))
        swapped = re.sub(rf"\b{word}\b", _swap(word, VOCAB[key], rng), response)
        return re.sub(r"\b(an?) (\w)", lambda m: f"{article(m.group(2))} {m.group(2)}", swapped)
    return response.rsplit(" ", 3)[0]  # cut off mid-sentence


def task_of(prompt: str) -> str:
    if prompt.startswith("Write a short story"):
        return "story"
    if prompt.startswith("Read the story"):
        return "qa"
    if prompt.startswith("Is this sentence"):
        return "sentiment"
    if prompt.startswith("Summarize the story"):
        return "summary"
    return "unknown"


def is_heldout(prompt: str) -> bool:
    """One prompt in ten is held out of all training data, by a stable hash of its text."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10 == 0


def _prompts(seed: int, n: int, heldout: bool):
    """Yield n (prompt, correct response) pairs, cycling through the tasks, on one side of the split."""
    rng = random.Random(seed)
    i = 0
    while i < n:
        task = TASKS[i % len(TASKS)]
        prompt, response = make_prompt(rng, task)
        if is_heldout(prompt) == heldout:
            yield rng, prompt, response
            i += 1


# ---------------------------------------------------------------------------------------------
# Data for each stage
# ---------------------------------------------------------------------------------------------

def generate_corpus(n: int, seed: int) -> list[str]:
    """n short stories for pretraining."""
    rng = random.Random(seed)
    return [render_story(sample_story(rng)) for _ in range(n)]


def generate_demonstrations(n: int, seed: int, flawed_share: float = 0.3) -> list[dict]:
    """n chat demonstrations in TRL's conversational format; a share of them is flawed."""
    rows = []
    for rng, prompt, response in _prompts(seed, n, heldout=False):
        flawed = rng.random() < flawed_share
        if flawed:
            response = make_flawed(rng, prompt, response)
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": response}],
                     "task": task_of(prompt), "flawed": flawed})
    return rows


def generate_preferences(n: int, seed: int, heldout: bool = False) -> list[dict]:
    """n preference pairs in TRL's conversational format: chosen correct, rejected flawed."""
    rows = []
    for rng, prompt, response in _prompts(seed, n, heldout=heldout):
        rejected = make_flawed(rng, prompt, response)
        while rejected == response:
            rejected = make_flawed(rng, prompt, response)
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": response}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "task": task_of(prompt)})
    return rows


def generate_prompts(n: int, seed: int, heldout: bool) -> list[dict]:
    """n prompts in TRL's conversational prompt format, with the correct response for reference."""
    return [{"prompt": [{"role": "user", "content": prompt}], "reference": response, "task": task_of(prompt)}
            for _, prompt, response in _prompts(seed, n, heldout=heldout)]


# ---------------------------------------------------------------------------------------------
# The gold judge
# ---------------------------------------------------------------------------------------------

def _sentences(text: str) -> list[str]:
    return [x.strip() for x in re.findall(r"[^.!?]+[.!?]?", text) if x.strip()]


def form_score(task: str, response: str) -> float:
    """How well-formed a response is, in [0, 1]: ends properly, no repetition, not too long."""
    sentences = _sentences(response)
    if not sentences:
        return 0.0
    ends = response.rstrip().endswith((".", "!", "?"))
    unique = len({s.lower() for s in sentences}) / len(sentences)
    words = len(response.split())
    concise = 1.0 if words <= MAX_WORDS[task] else max(0.0, 1.0 - (words - MAX_WORDS[task]) / MAX_WORDS[task])
    return (0.4 * ends + 0.6 * unique) * concise


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def content_score(prompt: str, response: str) -> float:
    """Whether a response does what the prompt asks, in [0, 1]."""
    task = task_of(prompt)
    if task == "story":
        m = re.match(r"Write a short story about (\w+), an? (\w+) and an? (\w+) (\w+)\.", prompt)
        if m is None:  # begins like a demo prompt, but is not one: nothing to check it against
            return 0.0
        person, animal, colour, obj = m.groups()
        found = find_story_elements(response)
        hits = [_mentions(response, person), _mentions(response, animal),
                found["colour"] == colour and found["obj"] == obj]
        wrong = [w for w in ANIMALS if w != animal and _mentions(response, w)]
        return max(0.0, sum(hits) / len(hits) - 0.3 * bool(wrong))
    story, _, question = prompt.partition("\n\nQuestion: ")
    if task == "qa":
        facts = find_story_elements(story)
        pattern = lambda q: re.escape(q).replace(r"\{obj\}", r"\w+").replace(r"\{person\}", r"\w+")
        kind = next((k for k, q in QA_QUESTIONS.items() if re.fullmatch(pattern(q), question)), None)
        if kind is None:
            return 0.0
        vocab = {"colour": COLOURS, "place": PLACES, "animal": ANIMALS, "ending": FEELINGS}[kind]
        said = {w for w in vocab if _mentions(response, w)}
        return 1.0 if said == {facts[kind]} else 0.0
    if task == "sentiment":
        sentence = prompt.partition("\n\n")[2]
        label = "positive" if any(_mentions(sentence, w) for w in POSITIVE_WORDS) else "negative"
        other = "negative" if label == "positive" else "positive"
        return 1.0 if _mentions(response, label) and not _mentions(response, other) else 0.0
    if task == "summary":
        facts = find_story_elements(story)
        need = [facts["person"], facts["place"], facts["animal"], facts["obj"]]
        if None in need:  # not a demo story
            return 0.0
        hits = sum(_mentions(response, w) for w in need) / len(need)
        wrong = [w for w in PLACES + ANIMALS + OBJECTS if w not in need and _mentions(response, w)]
        one_sentence = len(_sentences(response)) == 1
        return max(0.0, hits - 0.3 * bool(wrong)) * (1.0 if one_sentence else 0.5)
    return 0.0


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: 0.7 for doing what was asked, 0.3 for a well-formed answer; 0 for nothing."""
    task = task_of(prompt)
    if task == "unknown" or not response.strip():
        return 0.0
    return round(0.7 * content_score(prompt, response) + 0.3 * form_score(task, response), 4)
