"""Invented documents with questions: training data for the shared reader that no benchmark
row is part of.

Each document is one paragraph of 4-5 sentences about a made-up subject (a craftsperson, a
firm, a ship, a species, a novel, a town), every name drawn from random syllables, so a model
can answer only from the document. Its questions are of the three kinds the docs benchmark
reports: ``direct`` (one sentence that names its subject answers it), ``pronoun`` (the
answer's sentence refers to the subject by "she", "it", "the firm"), ``bridge`` (two sentences
joined through an entity). Every answer is a verbatim span of the document. Sentence shapes and
question wordings vary per document, so a reader trained on them learns to read the composed
atoms, not one template; the rows have the cpkc/docs JSONL format (``microlora.evaluation
.datasets``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "tr", "v", "w", "z", "sh", "kl", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "ll", "st"]
_PLACE_ENDS = ["ford", "mere", "beck", "holm", "wick", "stead", "port", "by", "dale", "ton",
               "bridge", "haven", "moor", "field"]
_CRAFTS = [("glassblower", "glassworks", "lanterns"), ("potter", "pottery", "blue jugs"),
           ("clockmaker", "clock shop", "pocket watches"), ("weaver", "weaving mill", "rugs"),
           ("printer", "print shop", "almanacs"), ("luthier", "workshop", "fiddles"),
           ("brewer", "brewery", "dark ales"), ("cartographer", "map house", "sea charts")]
_JOBS = ["miller", "ferryman", "schoolteacher", "blacksmith", "fisherman", "baker", "surveyor",
         "bookbinder", "tailor", "shepherd"]
_PRODUCTS = ["bicycle", "sewing machine", "typewriter", "stove", "radio", "wristwatch",
             "camera", "lawn mower"]
_DIVISIONS = ["northern", "southern", "overseas", "eastern"]
_SHIPS = ["schooner", "steamer", "brigantine", "cargo ship", "packet boat"]
_CARGO = ["coal", "timber", "salt fish", "wool", "copper ore", "grain", "tea"]
_ANIMALS = [("songbird", "insects"), ("lizard", "beetles"), ("frog", "ants"), ("bat", "moths"),
            ("owl", "mice"), ("fish", "algae"), ("beetle", "fallen fruit")]
_HABITATS = ["cloud forests", "salt marshes", "limestone caves", "river valleys", "high moors"]
_BUILDINGS = ["Hall", "Tower", "Exchange", "House", "Chapel", "Library"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_FESTIVALS = ["Fair", "Festival", "Regatta", "Market", "Games"]
_TOWN_GOODS = ["smoked cheese", "slate roofs", "woollen blankets", "cider", "lace", "honey"]
_FORTUNES = ["the timber trade", "shipping", "silver mining", "banking", "the wool trade"]
_HERO_JOBS = ["lighthouse keeper", "young cook", "retired soldier", "river pilot", "clerk"]

Question = tuple[str, str, str]  # (question, answer, kind)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _person(rng: random.Random) -> tuple[str, str, str, str]:
    """(full name, surname, subject pronoun, possessive)."""
    first, last = _word(rng, rng.choice([1, 2])), _word(rng, 2)
    she = rng.random() < 0.5
    return f"{first} {last}", last, "she" if she else "he", "her" if she else "his"


def _place(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return f"{rng.choice(['Port', 'Upper', 'Saint', 'North'])} {_word(rng, 2)}"
    return _word(rng, rng.choice([1, 2])) + rng.choice(_PLACE_ENDS)


def _year(rng: random.Random) -> str:
    return str(rng.randint(1700, 1990))


def _craftsperson(rng: random.Random) -> tuple[list[str], list[Question]]:
    p, last, she, her = _person(rng)
    m, m_last, _, m_his = _person(rng)
    craft, shop, goods = rng.choice(_CRAFTS)
    home, trained, own, year = _place(rng), _place(rng), _place(rng), _year(rng)
    parent = rng.choice(["father", "mother"])
    sentences = [
        rng.choice([f"{p} grew up in {home}, where {her} {parent} was a {rng.choice(_JOBS)}.",
                    f"{p} was raised in the town of {home}."]),
        rng.choice([f"As a young {'woman' if she == 'she' else 'man'}, {last} was apprenticed "
                    f"to the {craft} {m}.", f"{p.split()[0]} learned the trade from the "
                    f"{craft} {m}."]),
        f"{m_last} had learned {m_his} own craft in {trained}.",
        rng.choice([f"In {year} {she} opened {her} own {shop} in {own}.",
                    f"{she.capitalize()} later set up a {shop} in {own}."]),
        f"Within a decade {her} {goods} were sold along the whole coast.",
    ]
    questions = [
        (rng.choice([f"Where did {p} grow up?", f"In which town was {p} raised?"]), home, "direct"),
        (rng.choice([f"Who taught {p} the trade?", f"Which {craft} trained {p}?"]), m, "direct"),
        (rng.choice([f"Where did the {craft} who taught {p} learn the craft?",
                     f"In which town did {p}'s teacher learn {m_his} trade?"]), trained, "bridge"),
        (rng.choice([f"In which town did {p} open a {shop}?",
                     f"Where did {p} set up {her} own {shop}?"]), own, "pronoun"),
    ]
    questions.append((f"What did {p} become known for?", goods, "pronoun"))
    if year in sentences[3]:
        questions.append((f"In what year did {p} open {her} own {shop}?", year, "pronoun"))
    return sentences, questions


def _firm(rng: random.Random) -> tuple[list[str], list[Question]]:
    org = f"{_word(rng, 2)} {rng.choice(['& Sons', 'Works', 'Company', 'Brothers'])}"
    p, last, she, her = _person(rng)
    sib = f"{_person(rng)[0].split()[0]} {last}"  # a sibling: the founder's surname
    origin, hq, school = _place(rng), _place(rng), _place(rng)
    year, moved = _year(rng), _year(rng)
    product, model, division = rng.choice(_PRODUCTS), _word(rng, 2), rng.choice(_DIVISIONS)
    job = rng.choice(_JOBS)
    sentences = [
        rng.choice([f"{org} was founded in {year} by {p}, a former {job} from {origin}.",
                    f"{p}, a {job} from {origin}, started {org} in {year}."]),
        f"The firm's first product was a {product} called the {model}.",
        rng.choice([f"In {moved} it moved its headquarters to {hq}.",
                    f"It later moved its head office to {hq}."]),
        f"{last}'s sibling {sib} ran the company's {division} office.",
        f"{sib.split()[0]} had trained as an engineer in {school}.",
    ]
    return sentences, [
        (rng.choice([f"Who founded {org}?", f"Who started the company {org}?"]), p, "direct"),
        (f"In what year was {org} founded?", year, "direct"),
        (f"Where was the founder of {org} from?", origin, "direct"),
        (rng.choice([f"What was the first product of {org} called?",
                     f"What was {org}'s first {product} called?"]), model, "pronoun"),
        (rng.choice([f"Where did {org} move its headquarters?",
                     f"Where is the head office of {org}?"]), hq, "pronoun"),
        (f"Who ran the {division} office of {org}?", sib, "pronoun"),
        (rng.choice([f"Where did the person who ran {org}'s {division} office train?",
                     f"In which town did the founder's sibling at {org} train?"]), school,
         "bridge"),
    ]


def _ship(rng: random.Random) -> tuple[list[str], list[Question]]:
    ship = f"{_word(rng, 2)} {rng.choice(['Star', 'Queen', 'Wind', 'Rose', ''])}".strip()
    kind = rng.choice(_SHIPS)
    p, last, she, her = _person(rng)
    yard, home, port_a, port_b, wreck = (_place(rng) for _ in range(5))
    year, cargo = _year(rng), rng.choice(_CARGO)
    sentences = [
        f"The {ship} was a {kind} built at {yard} in {year}.",
        f"Her first captain was {p}.",
        f"{last} had grown up in {home} and sailed as a deckhand for ten years.",
        f"The ship carried {cargo} between {port_a} and {port_b}.",
        rng.choice([f"She ran aground off {wreck} and was broken up.",
                    f"Her last voyage ended on the rocks near {wreck}."]),
    ]
    return sentences, [
        (rng.choice([f"Where was the {ship} built?", f"At which yard was the {ship} built?"]),
         yard, "direct"),
        (f"When was the {ship} built?", year, "direct"),
        (f"What kind of vessel was the {ship}?", kind, "direct"),
        (f"Who was the first captain of the {ship}?", p, "pronoun"),
        (rng.choice([f"Where did the first captain of the {ship} grow up?",
                     f"In which town did the {ship}'s first captain spend {her} youth?"]), home,
         "bridge"),
        (rng.choice([f"What cargo did the {ship} carry?", f"What did the {ship} carry?"]),
         cargo, "direct"),
        (f"Where was the {ship} wrecked?", wreck, "pronoun"),
    ]


def _species(rng: random.Random) -> tuple[list[str], list[Question]]:
    animal, food = rng.choice(_ANIMALS)
    name = f"{_word(rng, 2)} {animal}"
    land, habitat, museum = _word(rng, 3), rng.choice(_HABITATS), _place(rng)
    p, last, she, her = _person(rng)
    year = _year(rng)
    sentences = [
        f"The {name} is found only in the {habitat} of {land}.",
        rng.choice([f"It feeds mainly on {food}.", f"Its diet consists largely of {food}."]),
        f"The species was first described in {year} by the naturalist {p}.",
        f"{last} later founded the natural history museum in {museum}.",
    ]
    return sentences, [
        (rng.choice([f"In which country is the {name} found?", f"Where does the {name} live?"]),
         land, "direct"),
        (f"What does the {name} feed on?", food, "pronoun"),
        (f"In what kind of place does the {name} live?", habitat, "direct"),
        (rng.choice([f"Who first described the {name}?",
                     f"Which naturalist described the {name}?"]),
         p, "pronoun"),
        (f"In what year was the {name} first described?", year, "pronoun"),
        (rng.choice([f"Where is the museum founded by the naturalist who described the {name}?",
                     f"In which town did the person who described the {name} found a museum?"]),
         museum, "bridge"),
    ]


def _novel(rng: random.Random) -> tuple[list[str], list[Question]]:
    title = f"The {rng.choice(['Road to', 'Winter in', 'Lights of', 'Bells of'])} {_place(rng)}"
    p, last, she, her = _person(rng)
    hero, _, _, _ = _person(rng)
    publisher, lived, city, goal = (f"{_word(rng, 2)} Press", _place(rng), _place(rng),
                                    _place(rng))
    year, job = _year(rng), rng.choice(_HERO_JOBS)
    sentences = [
        f"{title} is a novel by {p}, published in {year} by {publisher}.",
        rng.choice([f"{she.capitalize()} wrote it while living in {lived}.",
                    f"The author wrote the book in {lived}."]),
        f"The story follows {hero}, a {job} who travels to {goal}.",
        f"{publisher} had been founded in {city} by two brothers.",
    ]
    return sentences, [
        (rng.choice([f"Who wrote {title}?", f"Who is the author of {title}?"]), p, "direct"),
        (f"When was {title} published?", year, "direct"),
        (f"Which press published {title}?", publisher, "direct"),
        (f"Where did {p} write {title}?", lived, "pronoun"),
        (f"Who is the main character of {title}?", hero, "direct"),
        (f"Where does the hero of {title} travel to?", goal, "direct"),
        (rng.choice([f"In which town was the publisher of {title} founded?",
                     f"Where was the press that published {title} founded?"]), city, "bridge"),
    ]


def _town(rng: random.Random) -> tuple[list[str], list[Question]]:
    town, river = _place(rng), _word(rng, 2)
    goods, fortune = rng.choice(_TOWN_GOODS), rng.choice(_FORTUNES)
    building = f"{_word(rng, 2)} {rng.choice(_BUILDINGS)}"
    p, last, she, her = _person(rng)
    festival = f"{_word(rng, 2)} {rng.choice(_FESTIVALS)}"
    year, season = _year(rng), rng.choice(_SEASONS)
    sentences = [
        f"{town} is a small town on the {river} river.",
        rng.choice([f"It is best known for its {goods}.", f"The town is famous for {goods}."]),
        f"Its oldest building is the {building}, built in {year} for {p}.",
        f"{last} had made {her} fortune in {fortune}.",
        f"Every {season} the town holds the {festival}.",
    ]
    return sentences, [
        (f"On which river does {town} lie?", river, "direct"),
        (f"What is {town} known for?", goods, "pronoun"),
        (f"What is the oldest building in {town}?", building, "pronoun"),
        (f"When was the {building} built?", year, "direct"),
        (f"For whom was the {building} built?", p, "direct"),
        (rng.choice([f"How did the person the {building} was built for make {her} fortune?",
                     f"Where did the owner of {town}'s oldest building make {her} money?"]),
         fortune, "bridge"),
        (f"What festival does {town} hold every {season}?", festival, "pronoun"),
    ]


KINDS: list[Callable[[random.Random], tuple[list[str], list[Question]]]] = [
    _craftsperson, _firm, _ship, _species, _novel, _town]


def invent_rows(documents: int, seed: int = 0) -> list[dict]:
    """``documents`` invented documents and their questions as dataset rows
    (``{"id", "question", "context", "answer", "kind"}``), the same for the same seed."""
    rng = random.Random(seed)
    rows = []
    for d in range(documents):
        sentences, questions = KINDS[d % len(KINDS)](rng)
        context = " ".join(sentences)
        for q, (question, answer, kind) in enumerate(questions, 1):
            rows.append({"id": f"inv{d:05d}-q{q}", "question": question, "context": context,
                         "answer": answer, "kind": kind})
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSONL (the format ``microlora eval --data`` and ``reader train`` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path
