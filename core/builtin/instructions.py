"""Built-in instruction-following prompts with machine-checkable constraints (IFEval's format).

Each prompt is a short writing task ("Write a short poem about the ocean.") followed by one or
more constraints that IFEval's checkers can verify ("Answer with less than 60 words.", "In your
entire response, refrain from the use of any commas."). The records carry IFEval's columns:
``instruction_id_list`` (the checker ids) and ``kwargs`` (one dict of checker arguments per id),
so the ``verify_ifeval`` reward source scores completions against them.

Only constraint types a small model can plausibly satisfy are offered, each phrased as IFEval
phrases it (its checkers' own descriptions, with quotes added around words and phrases), so the
text asks for exactly what the checker tests. Constraints that contradict one another (all
lowercase and a "P.S.", JSON output and a title...) are never combined, and words a response
must use are never also forbidden. Generation is seeded and needs no package beyond the standard
library; values in ``kwargs`` are ints, strings and lists of strings (Arrow-friendly: datasets
stores the dicts as one struct, filling absent keys with None, which the verifier drops).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

# Task templates and topics (with words a constraint can require, count or forbid).
_TASKS = [
    "Write a short paragraph about {topic}.",
    "Write a short poem about {topic}.",
    "Describe {topic} to a child.",
    "Write a short story about {topic}.",
    "Explain what makes {topic} special.",
    "Write a short blog post about {topic}.",
    "Write a letter to a friend about {topic}.",
    "Give some advice to someone who is curious about {topic}.",
]

_TOPICS = [
    ("the ocean", ["waves", "salt", "tide", "fish", "blue"]),
    ("autumn", ["leaves", "cold", "harvest", "orange", "wind"]),
    ("a city at night", ["lights", "streets", "traffic", "quiet", "windows"]),
    ("learning to cook", ["recipe", "kitchen", "taste", "salt", "oven"]),
    ("your favourite book", ["story", "author", "pages", "characters", "chapter"]),
    ("a rainy day", ["umbrella", "clouds", "puddles", "wet", "thunder"]),
    ("the moon", ["night", "light", "orbit", "craters", "sky"]),
    ("coffee", ["morning", "cup", "bitter", "beans", "warm"]),
    ("a trip to the mountains", ["peak", "snow", "trail", "climb", "view"]),
    ("friendship", ["trust", "laugh", "help", "together", "kind"]),
    ("bicycles", ["wheels", "ride", "pedal", "road", "speed"]),
    ("gardening", ["seeds", "soil", "flowers", "water", "sun"]),
    ("starting a new job", ["office", "team", "nervous", "learn", "colleagues"]),
    ("dogs", ["bark", "walk", "loyal", "tail", "play"]),
    ("cats", ["purr", "whiskers", "sleep", "curious", "paws"]),
    ("music", ["song", "rhythm", "melody", "dance", "sound"]),
    ("the desert", ["sand", "heat", "dry", "camel", "dunes"]),
    ("winter", ["snow", "cold", "fire", "ice", "scarf"]),
    ("a library", ["books", "quiet", "shelves", "read", "librarian"]),
    ("trains", ["tracks", "station", "ticket", "travel", "journey"]),
    ("the importance of sleep", ["rest", "dreams", "night", "health", "tired"]),
    ("a birthday party", ["cake", "gifts", "candles", "friends", "balloons"]),
    ("recycling", ["plastic", "waste", "paper", "bins", "planet"]),
    ("the first day of school", ["teacher", "class", "nervous", "friends", "backpack"]),
    ("bees", ["honey", "flowers", "hive", "buzz", "queen"]),
    ("a lighthouse", ["light", "ships", "coast", "storm", "keeper"]),
    ("robots", ["machines", "metal", "program", "help", "future"]),
    ("breakfast", ["eggs", "bread", "morning", "toast", "juice"]),
    ("the stars", ["night", "sky", "light", "space", "shine"]),
    ("a long walk in the forest", ["path", "trees", "birds", "fresh", "air"]),
    ("learning a new language", ["words", "grammar", "practice", "speak", "mistakes"]),
    ("the history of bread", ["wheat", "flour", "oven", "baker", "ancient"]),
]

_END_PHRASES = [  # no commas, so that they combine with "no commas"
    "Is there anything else I can help with?",
    "Any other questions?",
    "Thank you for reading.",
    "That is all for today.",
    "Let me know if you have additional questions.",
]


_EVERYDAY_WORDS = ["very", "really", "thing", "nice", "good", "people"]


@dataclass
class _Context:
    rng: random.Random
    words: list[str]  # the topic's words still free to use
    used: set[str]  # words the response must contain (never forbidden)


def _take_words(ctx: _Context, k: int) -> list[str]:
    chosen = ctx.rng.sample(ctx.words, k)
    for word in chosen:
        ctx.words.remove(word)
        ctx.used.add(word)
    return chosen


def _lowercase(ctx):
    return {}, "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."


def _capital(ctx):
    return {}, "Your entire response should be in English, and in all capital letters."


def _capital_words(ctx):
    k = ctx.rng.randint(2, 4)
    return ({"capital_frequency": k, "capital_relation": "at least"},
            f"In your response, words with all capital letters should appear at least {k} times.")


def _no_comma(ctx):
    return {}, "In your entire response, refrain from the use of any commas."


def _end_phrase(ctx):
    phrase = ctx.rng.choice(_END_PHRASES)
    ctx.used.update(re.findall(r"[a-z]+", phrase.lower()))
    return ({"end_phrase": phrase},
            f'Finish your response with this exact phrase "{phrase}". No other words should follow this phrase.')


def _keywords(ctx):
    a, b = _take_words(ctx, 2)
    return {"keywords": [a, b]}, f'Include the keywords "{a}" and "{b}" in the response.'


def _keyword_frequency(ctx):
    (word,) = _take_words(ctx, 1)
    k = ctx.rng.randint(2, 3)
    return ({"keyword": word, "frequency": k, "relation": "at least"},
            f'In your response, the word "{word}" should appear at least {k} times.')


def _forbidden(ctx):
    free = [w for w in ctx.words if w not in ctx.used]
    if len(free) < 2:  # the topic's words are taken: forbid everyday words instead
        free += [w for w in _EVERYDAY_WORDS if w not in ctx.used and w not in free]
    a, b = ctx.rng.sample(free, 2)
    return {"forbidden_words": [a, b]}, f'Do not include the keywords "{a}" or "{b}" in the response.'


def _number_words(ctx):
    if ctx.rng.random() < 0.5:
        n, relation = ctx.rng.choice([40, 60, 80, 100, 150]), "less than"
    else:
        n, relation = ctx.rng.choice([20, 30, 50, 80]), "at least"
    return {"num_words": n, "relation": relation}, f"Answer with {relation} {n} words."


def _number_sentences(ctx):
    if ctx.rng.random() < 0.5:
        n, relation = ctx.rng.randint(3, 6), "less than"
    else:
        n, relation = ctx.rng.randint(2, 5), "at least"
    return {"num_sentences": n, "relation": relation}, f"Your response should contain {relation} {n} sentences."


def _paragraphs(ctx):
    n = ctx.rng.randint(2, 3)
    return ({"num_paragraphs": n},
            f"There should be {n} paragraphs. Paragraphs are separated with the markdown divider: ***")


def _title(ctx):
    return {}, "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."


def _postscript(ctx):
    marker = ctx.rng.choice(["P.S.", "P.P.S"])
    return ({"postscript_marker": marker},
            f"At the end of your response, please explicitly add a postscript starting with {marker}")


def _json(ctx):
    return {}, "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."


def _highlights(ctx):
    n = ctx.rng.randint(1, 3)
    return ({"num_highlights": n},
            f"Highlight at least {n} sections in your answer with markdown, i.e. *highlighted section*.")


def _quotation(ctx):
    return {}, "Wrap your entire response with double quotation marks."


def _bullets(ctx):
    n = ctx.rng.randint(2, 4)
    return ({"num_bullets": n},
            f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as:\n"
            "* This is point 1.\n* This is point 2")


def _placeholders(ctx):
    n = ctx.rng.randint(1, 3)
    return ({"num_placeholders": n},
            f"The response must contain at least {n} placeholders represented by square brackets, such as [address].")


def _two_responses(ctx):
    return {}, ("Give two different responses. Responses and only responses should be separated by 6 asterisk "
                "symbols: ******.")


def _sections(ctx):
    splitter = ctx.rng.choice(["Section", "SECTION"])
    n = ctx.rng.randint(2, 3)
    return ({"section_spliter": splitter, "num_sections": n},
            f"Your response must have {n} sections. Mark the beginning of each section with {splitter} X, such as:\n"
            f"{splitter} 1\n[content of section 1]\n{splitter} 2\n[content of section 2]")


# IFEval instruction id -> the function drawing its arguments and describing it. The order is the
# order in which arguments are drawn (forbidden words last: they avoid every word another needs).
INSTRUCTION_TYPES: dict[str, Callable[[_Context], tuple[dict, str]]] = {
    "change_case:english_lowercase": _lowercase,
    "change_case:english_capital": _capital,
    "change_case:capital_word_frequency": _capital_words,
    "punctuation:no_comma": _no_comma,
    "startend:end_checker": _end_phrase,
    "keywords:existence": _keywords,
    "keywords:frequency": _keyword_frequency,
    "length_constraints:number_words": _number_words,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _paragraphs,
    "detectable_format:title": _title,
    "detectable_content:postscript": _postscript,
    "detectable_format:json_format": _json,
    "detectable_format:number_highlighted_sections": _highlights,
    "startend:quotation": _quotation,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_content:number_placeholders": _placeholders,
    "combination:two_responses": _two_responses,
    "detectable_format:multiple_sections": _sections,
    "keywords:forbidden_words": _forbidden,
}

_CONFLICT_LISTS = {
    "change_case:english_lowercase": [  # "P.S.", "Section", a capitalised exact end phrase
        "change_case:english_capital", "change_case:capital_word_frequency", "detectable_content:postscript",
        "startend:end_checker", "detectable_format:multiple_sections"],
    "change_case:english_capital": [  # JSON's escapes (\n) and literals (true, null) are lowercase
        "change_case:capital_word_frequency", "detectable_format:multiple_sections", "detectable_format:json_format"],
    "detectable_format:json_format": [
        "punctuation:no_comma", "startend:end_checker", "length_constraints:number_sentences",
        "length_constraints:number_paragraphs", "detectable_format:title", "detectable_content:postscript",
        "detectable_format:number_highlighted_sections", "startend:quotation", "detectable_format:number_bullet_lists",
        "detectable_content:number_placeholders", "combination:two_responses", "detectable_format:multiple_sections"],
    "startend:quotation": ["combination:two_responses", "detectable_format:number_bullet_lists"],
    "combination:two_responses": [
        "length_constraints:number_paragraphs", "detectable_format:multiple_sections",
        "detectable_format:number_bullet_lists", "length_constraints:number_sentences"],
    "length_constraints:number_paragraphs": ["detectable_format:multiple_sections",
                                             "length_constraints:number_sentences"],
    "detectable_format:multiple_sections": ["length_constraints:number_sentences"],
    "detectable_format:number_bullet_lists": ["length_constraints:number_sentences"],
    "startend:end_checker": ["detectable_content:postscript"],  # both claim the end of the response
    # the sentence splitter ends a sentence after "P.S.": a postscript adds two sentences
    "detectable_content:postscript": ["length_constraints:number_sentences"],
}
CONFLICTS: dict[str, set[str]] = {iid: set() for iid in INSTRUCTION_TYPES}
for _a, _others in _CONFLICT_LISTS.items():
    for _b in _others:
        CONFLICTS[_a].add(_b)
        CONFLICTS[_b].add(_a)


@dataclass
class InstructionFollowingOptions:
    n: int = field(default=2000, metadata={"help": "Number of prompts."})
    seed: int = field(default=0, metadata={"help": "Generator seed (independent of the run seed)."})
    conversational: bool = field(default=True, metadata={
        "help": "Message lists (chat); false gives the prompt as plain text."})
    min_instructions: int = field(default=1, metadata={"help": "Fewest constraints per prompt."})
    max_instructions: int = field(default=2, metadata={
        "help": "Most constraints per prompt (fewer when the allowed types cannot be combined further)."})
    instructions: list[str] = field(default_factory=lambda: list(INSTRUCTION_TYPES), metadata={
        "help": "IFEval instruction ids to draw from: any of " + ", ".join(INSTRUCTION_TYPES) + "."})

    def validate(self):
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not 1 <= self.min_instructions <= self.max_instructions <= 4:
            raise ValueError("need 1 <= min_instructions <= max_instructions <= 4")
        unknown = [i for i in self.instructions if i not in INSTRUCTION_TYPES]
        if unknown or not self.instructions:
            raise ValueError(f"instructions must be a non-empty list of: {', '.join(INSTRUCTION_TYPES)} "
                             f"(unknown: {', '.join(unknown) or 'none'})")


def _draw_instructions(rng: random.Random, allowed: list[str], k: int) -> list[str]:
    chosen: list[str] = []
    for iid in rng.sample(allowed, len(allowed)):
        if len(chosen) == k:
            break
        if iid not in chosen and not any(iid in CONFLICTS[c] for c in chosen):
            chosen.append(iid)
    return chosen


def _join(task: str, sentences: list[str]) -> str:
    text = task
    for sentence in sentences:
        text += ("\n" if "\n" in sentence or "\n" in text else " ") + sentence
    return text


def instruction_following(options: InstructionFollowingOptions) -> list[dict]:
    """Writing tasks with 1-2 verifiable constraints, in IFEval's columns (for verify_ifeval).

    Columns: ``prompt``, ``instruction_id_list`` (IFEval ids), ``kwargs`` (one dict of checker
    arguments per id). Prompts only: for the online stage, where the policy writes the answers.
    """
    rng = random.Random(options.seed)
    allowed = list(dict.fromkeys(options.instructions))
    order = list(INSTRUCTION_TYPES)
    records = []
    for _ in range(options.n):
        topic, words = rng.choice(_TOPICS)
        task = rng.choice(_TASKS).format(topic=topic)
        k = rng.randint(options.min_instructions, options.max_instructions)
        ids = _draw_instructions(rng, allowed, k)
        ctx = _Context(rng=rng, words=list(words), used=set())
        drawn = {iid: INSTRUCTION_TYPES[iid](ctx) for iid in sorted(ids, key=order.index)}
        text = _join(task, [drawn[iid][1] for iid in ids])
        records.append({
            "prompt": [{"role": "user", "content": text}] if options.conversational else text,
            "instruction_id_list": ids,
            "kwargs": [drawn[iid][0] for iid in ids],
        })
    return records
