"""The built-in demo task: a small world of stories, generated deterministically from a seed, with
data for every stage (corpus, demonstrations, preference pairs, held-out prompts) and a gold judge.

The gold judge (`gold_score`) plays the human rater: it is never used for training, only to measure
whether a stage made the model better.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
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
    """A short story about the story's elements. Each is named again later in the story (the colour and the
    object together, the place at the end), as natural text mentions its entities again: in pretraining,
    these later mentions are what teaches the model to copy every kind of element from earlier in the text."""
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
            f"The {a} wanted to play with the {c} {o}.",
            f"The {a} helped {p} carry the {c} {o}.",
            f"{p} showed the {c} {o} to the {a}.",
        ])
        end = rng.choice([
            f"They played together at the {pl} all day, and {p} was very happy.",
            f"{p} smiled and was happy to have a new friend at the {pl}.",
            f"In the end, {p} and the {a} were happy at the {pl}.",
        ])
    else:
        event = rng.choice([
            f"The {a} ran away with the {c} {o}.",
            f"The {a} pushed the {c} {o} into the water.",
            f"{p} dropped the {c} {o} and the {a} stepped on it.",
        ])
        end = rng.choice([
            f"{p} was sad and went home from the {pl} alone.",
            f"{p} cried, and the day at the {pl} was not fun anymore.",
            f"In the end, {p} felt sad at the {pl}.",
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


def summary_of(s: Story) -> str:
    """The one-sentence summary of a story."""
    outcome = "had a happy day" if s.ending == "happy" else "ended the day sad"
    return (f"{s.person} took {article(s.colour)} {s.colour} {s.obj} to the {s.place}, "
            f"met {article(s.animal)} {s.animal} and {outcome}.")


def question_about(s: Story, kind: str) -> tuple[str, str]:
    """A question about one element of a story, and its answer."""
    answer = {"colour": f"The {s.obj} was {s.colour}.", "place": f"{s.person} went to the {s.place}.",
              "animal": f"{s.person} met {article(s.animal)} {s.animal}.", "ending": f"{s.person} felt {s.ending}."}
    return QA_QUESTIONS[kind].format(obj=s.obj, person=s.person), answer[kind]


def make_prompt(rng: random.Random, task: str) -> tuple[str, str]:
    """A (prompt, correct response) pair for one task."""
    s = sample_story(rng)
    if task == "story":
        prompt = (f"Write a short story about {s.person}, {article(s.animal)} {s.animal} "
                  f"and {article(s.colour)} {s.colour} {s.obj}.")
        return prompt, render_story(s)
    story = render_story(s)
    if task == "qa":
        question, answer = question_about(s, rng.choice(list(QA_QUESTIONS)))
        return f"Read the story and answer the question.\n\n{story}\n\nQuestion: {question}", answer
    if task == "sentiment":
        label = rng.choice(["positive", "negative"])
        prompt = f"Is this sentence positive or negative?\n\n{_sentiment_sentence(rng, s, label)}"
        return prompt, label.capitalize() + "."
    if task == "summary":
        return f"Summarize the story in one sentence.\n\n{story}", summary_of(s)
    raise ValueError(f"unknown demo task {task!r}; expected one of {TASKS}")


def _swap(word: str, vocab: list[str], rng: random.Random) -> str:
    return rng.choice([w for w in vocab if w != word])


# ---------------------------------------------------------------------------------------------
# Flaws: what a demonstration or a model's response gets wrong, by class
# ---------------------------------------------------------------------------------------------

# The flaw classes and their default shares of flawed demonstrations and rejected responses (data.flaw_shares).
# Each is something RLHF fixes in practice; `swap`, a single wrong element (a name, animal, colour, place or
# object), is the hard class: a reward model of the demo's size barely learns to see it in its budget.
FLAW_SHARES = {"verbosity": 0.15, "repetition": 0.15, "no_stop": 0.15, "unhelpful": 0.15, "format": 0.13,
               "wrong_label": 0.5, "swap": 0.14}
FLAWS = tuple(FLAW_SHARES)
# The classes a task's responses can have (a sentiment label names no element; only summaries and labels have
# a format of their own).
TASK_FLAWS = {"story": ("verbosity", "repetition", "no_stop", "unhelpful", "swap"),
              "qa": ("verbosity", "repetition", "no_stop", "unhelpful", "swap"),
              "sentiment": ("verbosity", "repetition", "no_stop", "unhelpful", "format", "wrong_label"),
              "summary": ("verbosity", "repetition", "no_stop", "unhelpful", "format", "swap")}
# The elements a swap can replace in each task's response: those the prompt asks for or states.
SWAP_ELEMENTS = {"story": ("person", "animal", "colour"), "summary": ("person", "place", "animal", "obj"),
                 "qa": ("colour", "place", "animal", "ending")}
# Padding spoken to the reader (the demo's answers and stories never say "I" or "you").
FILLER = ["I hope this helps.", "I hope you liked it.", "Thank you for reading it with me.",
          "Let me know if you have another question.", "I am happy to help with that.",
          "I think you will like this one.", "I read it very carefully for you."]
HEDGES = {"story": ["I cannot write that story.", "I am not sure I can write that.", "Sorry, I can't help with that."],
          "answer": ["I am not sure.", "I cannot answer that.", "I don't know.", "Sorry, I can't help with that.",
                     "It is hard to say."]}
_HEDGE = re.compile(r"\b(not sure|cannot|can't|don't know|hard to say|rather not)\b", re.IGNORECASE)
_READER = re.compile(r"\b(I|me|my|you|your)\b", re.IGNORECASE)


def pick_flaw(rng: random.Random, task: str, shares: dict[str, float] | None = None,
              swap_elements: Sequence[str] = ()) -> str | None:
    """A flaw class for a response to a task, drawn by the shares among the classes the task can have (None
    when the shares give none of them any weight); with swap_elements, swap only where the task has one of them."""
    shares = FLAW_SHARES if shares is None else shares
    classes = [c for c in TASK_FLAWS[task] if shares.get(c, 0) > 0
               and not (c == "swap" and swap_elements and not set(swap_elements) & set(SWAP_ELEMENTS[task]))]
    return rng.choices(classes, weights=[shares[c] for c in classes])[0] if classes else None


def swappable(task: str, response: str, swap_elements: Sequence[str] = ()) -> list[str]:
    """The elements of a response a swap can replace (of swap_elements, where given), one entry per vocabulary
    word of the element's that the response mentions."""
    keys = [k for k in SWAP_ELEMENTS[task] if not swap_elements or k in swap_elements]
    return [k for k in keys for w in VOCAB[k] if _mentions(response, w)]


def make_flawed(rng: random.Random, prompt: str, response: str, flaw: str, swap_elements: Sequence[str] = ()) -> str:
    """The correct response to a demo prompt, spoiled by one flaw class (a swap: of one of swap_elements, where
    given)."""
    task = task_of(prompt)
    sentences = re.findall(r"[^.!?]+[.!?]", response)
    if flaw == "verbosity":  # the answer, padded with talk to the reader
        return " ".join([response] + rng.sample(FILLER, rng.randint(1, 2)))
    if flaw == "repetition":  # the answer said again, or a story's sentences repeated
        if task == "story":
            i = rng.randrange(len(sentences) - 1)
            repeated = sentences[:i + 1] + sentences[max(0, i - 1):i + 1] + sentences[i + 1:]
            return " ".join(s.strip() for s in repeated)
        return " ".join([response] * rng.randint(2, 3))
    if flaw == "no_stop":  # rambles on and is cut off mid-sentence
        source = re.findall(r"[^.!?]+[.!?]", prompt.partition("\n\n")[2] or response) or sentences
        words = rng.choice(source).split()
        tail = " ".join(words[:rng.randint(2, max(2, len(words) - 2))]).rstrip(",.!?")
        return f"{response} {rng.choice(['And then', 'Then', 'After that,', 'And'])} {tail[0].lower() + tail[1:]}"
    if flaw == "unhelpful":  # a hedge or a refusal instead of the answer
        return rng.choice(HEDGES["story" if task == "story" else "answer"])
    if flaw == "wrong_label":
        return "Negative." if response.startswith("Positive") else "Positive."
    if flaw == "format":
        if task == "sentiment":  # a label with an explanation attached
            sentence = prompt.partition("\n\n")[2].rstrip(".")
            return f"{response.rstrip('.')}, because {sentence[0].lower() + sentence[1:]}."
        if task == "summary":  # a one-sentence summary that runs to several sentences
            head, _, rest = response.rstrip(".").partition(", met ")
            met, _, outcome = rest.partition(" and ")
            person = head.split()[0]
            return f"{head}. There {person} met {met}. In the end, {person} {outcome}."
    if flaw == "swap":  # one element the prompt asked for, replaced by another of its kind
        key = rng.choice(swappable(task, response, swap_elements))
        word = next(w for w in VOCAB[key] if _mentions(response, w))
        swapped = re.sub(rf"\b{word}\b", _swap(word, VOCAB[key], rng), response)
        return re.sub(r"\b(an?) (\w)", lambda m: f"{article(m.group(2))} {m.group(2)}", swapped)
    raise ValueError(f"the flaw class {flaw!r} does not apply to the {task} task; it takes {TASK_FLAWS[task]}")


def detect_flaws(prompt: str, response: str) -> set[str]:
    """The flaw classes a response to a demo prompt shows, found from its text alone (several can hold)."""
    task = task_of(prompt)
    sentences = _sentences(response)
    if not sentences:
        return {"unhelpful"}
    found = set()
    reader = [s for s in sentences if _READER.search(s) and not _HEDGE.search(s)]
    if reader:
        found.add("verbosity")
    if len({s.lower().rstrip(".!?") for s in sentences}) < len(sentences):
        found.add("repetition")
    if not response.rstrip().endswith((".", "!", "?")):
        found.add("no_stop")
    if any(_HEDGE.search(s) for s in sentences):
        found.add("unhelpful")
    finished = sentences[:-1] if "no_stop" in found else sentences  # an unfinished sentence is not a second one
    said = [s for s in dict.fromkeys(s.lower() for s in finished) if not _READER.search(s)]
    if task == "sentiment":
        label = _true_label(prompt)
        first = re.findall(r"[a-z]+", sentences[0].lower())
        if first and first[0] in ("positive", "negative") and len(first) > 1:
            found.add("format")
        if _mentions(response, "positive" if label == "negative" else "negative"):
            found.add("wrong_label")
    elif task == "summary" and len(said) > 1:
        found.add("format")
    if task in ("story", "qa", "summary") and _wrong_elements(prompt, response):
        found.add("swap")
    return found


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


def _prompts(seed: int, n: int | None, heldout: bool):
    """Yield n (or, for None, endless) (prompt, correct response) pairs, cycling through the tasks, on one side
    of the split."""
    rng = random.Random(seed)
    i = 0
    while n is None or i < n:
        task = TASKS[i % len(TASKS)]
        prompt, response = make_prompt(rng, task)
        if is_heldout(prompt) == heldout:
            yield rng, prompt, response
            i += 1


# ---------------------------------------------------------------------------------------------
# Data for each stage
# ---------------------------------------------------------------------------------------------

# A reader's questions in the corpus: the instructions' questions, and one about the story's object.
CORPUS_QUESTIONS = (*QA_QUESTIONS, "obj")


def _reader_part(rng: random.Random, s: Story) -> str:
    """One thing a reader says about a story: a recap, a line quoted from it, a question and its answer, a
    summary, or a sentence and its sentiment; each repeats some of the story's elements."""
    kind = rng.choices(["recap", "quote", "qa", "summary", "sentiment"], weights=[3, 3, 4, 2, 1])[0]
    if kind == "quote":  # word for word: the plainest case of copying from earlier in the text
        named = (s.colour, s.obj, s.place, s.animal)
        lines = [x for x in _sentences(render_story(s)) if any(_mentions(x, w) for w in named)]
        return f"{rng.choice(['The best line:', 'A line to remember:', 'Quote:'])} \"{rng.choice(lines)}\""
    if kind == "recap":
        return rng.choice([
            f"That evening, {s.person} told {s.possessive} family about the {s.animal}, the {s.place} and the "
            f"{s.colour} {s.obj}.",
            f"{s.pronoun} kept the {s.colour} {s.obj} and never forgot the {s.animal} at the {s.place}.",
            f"The next day, {s.person} went back to the {s.place} with the {s.colour} {s.obj} to look for the "
            f"{s.animal}.",
        ])
    if kind == "qa":
        asked = rng.choice(CORPUS_QUESTIONS)
        if asked == "obj":
            question, answer = f"What did {s.person} have?", f"{s.person} had {article(s.colour)} {s.colour} {s.obj}."
        else:
            question, answer = question_about(s, asked)
        return f"Question: {question}\nAnswer: {answer}"
    if kind == "summary":
        return f"{rng.choice(['In one sentence:', 'Summary:', 'Summarize the story in one sentence.'])} {summary_of(s)}"
    label = rng.choice(["positive", "negative"])
    return f"Is this sentence positive or negative? {_sentiment_sentence(rng, s, label)} It is {label}."


def corpus_document(rng: random.Random) -> str:
    """A story and two to four things readers make of it, as natural text around stories does (recaps, quoted
    lines, questions and answers, one-line summaries, sentiment statements). So pretraining covers the language
    of the later stages' instructions, and has the model copy every kind of element (person, animal, colour,
    object, place) from earlier in the text, as the later stages' tasks all ask it to (README, Pretraining:
    the copy rate per kind)."""
    s = sample_story(rng)
    parts = [_reader_part(rng, s) for _ in range(rng.choice([2, 3, 3, 4]))]
    intro = rng.choice(["Read the story and answer the question.", "A reader wrote about the story.", ""])
    return "\n\n".join(x for x in (intro, render_story(s), *parts) if x)


def generate_corpus(n: int, seed: int) -> list[str]:
    """n documents for pretraining: short stories, each with readers' recaps, quoted lines, questions and
    answers, summaries or sentiment statements."""
    rng = random.Random(seed)
    return [corpus_document(rng) for _ in range(n)]


def generate_demonstrations(n: int, seed: int, flawed_share: float = 0.3,
                            flaw_shares: dict[str, float] | None = None) -> list[dict]:
    """n chat demonstrations in TRL's conversational format; a share of them is flawed, each row naming its
    flaw class (`flaw`, None for a correct one)."""
    rows = []
    for rng, prompt, response in _prompts(seed, n, heldout=False):
        flaw = pick_flaw(rng, task_of(prompt), flaw_shares) if rng.random() < flawed_share else None
        if flaw:
            response = make_flawed(rng, prompt, response, flaw)
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": response}],
                     "task": task_of(prompt), "flaw": flaw})
    return rows


def generate_preferences(n: int, seed: int, heldout: bool = False, flaw_shares: dict[str, float] | None = None,
                         swap_elements: Sequence[str] = ()) -> list[dict]:
    """n preference pairs in TRL's conversational format: chosen correct, rejected flawed (its class in `flaw`);
    swaps replace one of swap_elements where given (any element the task has, by default)."""
    rows = []
    for rng, prompt, response in _prompts(seed, None, heldout=heldout):
        if len(rows) == n:
            break
        flaw = pick_flaw(rng, task_of(prompt), flaw_shares, swap_elements)
        if flaw == "swap" and not swappable(task_of(prompt), response, swap_elements):  # an answer naming none
            flaw = pick_flaw(rng, task_of(prompt), {**(flaw_shares or FLAW_SHARES), "swap": 0})
        if flaw is None:  # the shares leave this task no flaw class: no pair for it
            continue
        rejected = make_flawed(rng, prompt, response, flaw, swap_elements)
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": response}],
                     "rejected": [{"role": "assistant", "content": rejected}],
                     "task": task_of(prompt), "flaw": flaw})
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


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def _true_label(prompt: str) -> str:
    sentence = prompt.partition("\n\n")[2]
    return "positive" if any(_mentions(sentence, w) for w in POSITIVE_WORDS) else "negative"


def _asked(prompt: str) -> tuple[str, dict[str, str]] | None:
    """(task, {kind: the right word}) for the elements a story, QA or summary prompt asks to be repeated."""
    task = task_of(prompt)
    if task == "story":
        m = re.match(r"Write a short story about (\w+), an? (\w+) and an? (\w+) (\w+)\.", prompt)
        return m and (task, dict(zip(("person", "animal", "colour", "obj"), m.groups())))
    story, _, question = prompt.partition("\n\nQuestion: ")
    facts = find_story_elements(story)
    if task == "qa":
        pattern = lambda q: re.escape(q).replace(r"\{obj\}", r"\w+").replace(r"\{person\}", r"\w+")
        kind = next((k for k, q in QA_QUESTIONS.items() if re.fullmatch(pattern(q), question)), None)
        if not (kind and facts[kind]):
            return None
        # the asked kind first; an answer must not name another person or, for a colour, another object
        also = {"person": facts["person"], **({"obj": facts["obj"]} if kind == "colour" else {})}
        return task, {kind: facts[kind], **also}
    if task == "summary":
        need = {k: facts[k] for k in ("person", "place", "animal", "obj")}
        return None not in need.values() and (task, need) or None
    return None


def _wrong_elements(prompt: str, response: str) -> list[str]:
    """Words of a kind the prompt asks about that the response names in place of the right one."""
    asked = _asked(prompt)
    if not asked:
        return []
    task, right = asked
    kinds = ("person", "animal", "colour", "obj", "place") if task == "story" else tuple(right)
    if task == "summary":
        kinds += ("colour",)
        right = {**right, "colour": find_story_elements(prompt)["colour"]}
    return [w for k in kinds if right.get(k) for w in VOCAB[k]
            if w.lower() != right[k].lower() and _mentions(response, w)
            and not (task == "story" and k == "place")]  # a story may go anywhere


def content_score(prompt: str, response: str) -> float:
    """Whether a response does what the prompt asks, in [0, 1]: the elements it must repeat, the right label."""
    task = task_of(prompt)
    if task == "sentiment":
        label = _true_label(prompt)
        other = "negative" if label == "positive" else "positive"
        return 1.0 if _mentions(response, label) and not _mentions(response, other) else 0.0
    asked = _asked(prompt)
    if not asked:  # begins like a demo prompt, but is not one: nothing to check it against
        return 0.0
    _, right = asked
    wrong = bool(_wrong_elements(prompt, response))
    if task == "qa":
        return 0.0 if wrong else float(_mentions(response, next(iter(right.values()))))
    if task == "story":
        found = find_story_elements(response)
        hits = [_mentions(response, right["person"]), _mentions(response, right["animal"]),
                found["colour"] == right["colour"] and found["obj"] == right["obj"]]
    else:
        hits = [_mentions(response, w) for w in right.values()]
    return max(0.0, sum(hits) / len(hits) - 0.3 * wrong)


FORM_FLAWS = ("verbosity", "repetition", "no_stop", "format")


def form_score(prompt: str, response: str) -> float:
    """How well-formed a response is, in [0, 1]: each form flaw it shows halves it; past the task's length
    limit it falls to 0."""
    task = task_of(prompt)
    words = len(response.split())
    concise = 1.0 if words <= MAX_WORDS[task] else max(0.0, 1.0 - (words - MAX_WORDS[task]) / MAX_WORDS[task])
    return 0.5 ** len(detect_flaws(prompt, response) & set(FORM_FLAWS)) * concise


def gold_score(prompt: str, response: str) -> float:
    """The gold judge: doing what was asked (content_score) times saying it well (form_score); 0 for nothing."""
    task = task_of(prompt)
    if task == "unknown" or not response.strip():
        return 0.0
    return round(content_score(prompt, response) * form_score(prompt, response), 4)
