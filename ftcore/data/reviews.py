"""The embedded default data: a seeded generator of short product reviews.

Each record is {id, product, rating, summary, text}, so the whole pipeline runs on a fresh machine
with no download. The rating is learnable from the text but never leaked by it: the text holds no
digits, no number words, no "star" and none of the labels positive/neutral/negative. What carries
the rating is how the reviewer talks about two to four aspects of the product, with graded
intensity that maps to the rating:

    5  every aspect praised strongly ("simply perfect", "blown away by")
    4  mild praise ("pretty good", "works well"), sometimes one small gripe
    3  mixed: a lukewarm remark ("just okay", "so-so") next to mild praise and mild criticism
    2  mild criticism ("a bit disappointing"), sometimes one small upside
    1  every aspect criticised strongly ("a complete disaster", "utterly useless")

plus a neutral opener and, often, a closing verdict in the same register. Phrasing varies (several
sentence patterns per level, connectors, many products and aspects), and the 2/3/4 reviews mix
praise and criticism, so a model must weigh the sentences rather than spot one word. Texts are
short (about 25-60 words) to keep the CPU quickstart fast.
"""
from __future__ import annotations

import random

# product type -> (aspects, reasons for buying); brands are combined with each type
PRODUCTS: dict[str, tuple[list[str], list[str]]] = {
    "coffee maker": (["brewing speed", "flavor", "carafe", "water tank", "control panel", "build quality"],
                     ["for my morning routine", "for the office kitchen", "to replace an old machine"]),
    "headphones": (["sound quality", "battery life", "comfort", "noise cancelling", "bluetooth connection",
                    "carrying case"], ["for my commute", "for working from home", "for the gym"]),
    "running shoes": (["fit", "cushioning", "grip", "breathability", "sole", "lacing"],
                      ["for training", "for long walks", "for my first race"]),
    "backpack": (["zipper", "padding", "shoulder strap", "laptop sleeve", "fabric", "pocket layout"],
                 ["for school", "for travel", "for hiking"]),
    "blender": (["motor", "jar", "blade assembly", "lid", "noise level", "speed dial"],
                ["for smoothies", "for soups", "to make baby food"]),
    "desk lamp": (["brightness", "color temperature", "base", "switch", "flexible arm", "light spread"],
                  ["for late reading", "for my home office", "for my daughter's desk"]),
    "phone case": (["grip", "button feel", "drop protection", "finish", "camera cutout", "thickness"],
                   ["for my new phone", "after cracking a screen", "as a spare"]),
    "tent": (["waterproofing", "setup process", "floor", "ventilation", "pole design", "storage bag"],
             ["for a camping trip", "for festivals", "for the backyard"]),
    "electric kettle": (["heating speed", "handle", "spout", "lid hinge", "auto shutoff", "cord length"],
                        ["for tea", "for the dorm", "for instant noodles"]),
    "keyboard": (["key feel", "backlight", "wrist rest", "layout", "typing sound", "wireless range"],
                 ["for programming", "for gaming", "for writing"]),
    "water bottle": (["lid", "insulation", "mouthpiece", "coating", "carry loop", "seal"],
                     ["for the gym", "for hiking", "for the car"]),
    "vacuum cleaner": (["suction", "filter", "dust bin", "brush roll", "hose", "battery"],
                       ["for pet hair", "for a small apartment", "for the stairs"]),
    "office chair": (["lumbar support", "armrest", "seat cushion", "recline", "wheel base", "upholstery"],
                     ["for long workdays", "for my study", "for gaming sessions"]),
    "cast iron skillet": (["heat retention", "seasoning", "handle", "weight", "cooking surface", "pour spout"],
                          ["for searing steak", "for camping", "for cornbread"]),
    "green tea": (["taste", "aroma", "packaging", "freshness", "tea bag", "aftertaste"],
                  ["for the afternoons", "to cut back on coffee", "for my mother"]),
    "dog food": (["ingredient list", "kibble size", "smell", "bag closure", "texture", "digestibility"],
                 ["for our puppy", "for an older dog", "for a picky eater"]),
    "hot sauce": (["heat level", "flavor", "bottle", "consistency", "aftertaste", "label"],
                  ["for tacos", "for a chili night", "as a gift for a friend"]),
    "granola": (["crunch", "sweetness", "nut mix", "resealable bag", "texture", "ingredient list"],
                ["for breakfast", "for hiking snacks", "for the kids"]),
    "olive oil": (["flavor", "aroma", "bottle", "color", "pour spout", "freshness"],
                  ["for salads", "for everyday cooking", "for dipping bread"]),
    "yoga mat": (["grip", "thickness", "surface texture", "smell", "carrying strap", "durability"],
                 ["for home practice", "for a class", "for stretching"]),
}
BRANDS = ["Lumo", "Northwind", "Brightway", "Kestrel", "Oakline", "Vantor", "Pebble & Pine", "Solara",
          "Mistral Home", "Ardent", "Bluefield", "Cobalt", "Tidewell", "Harbor", "Juniper", "Everkeen"]

# aspect sentences by register; {a} = aspect, {p} = product type
STRONG_POS = [
    "The {a} is absolutely fantastic.", "I am blown away by the {a}.", "The {a} is simply perfect.",
    "The {a} is incredible, far beyond what I expected.", "Honestly, the {a} is outstanding.",
    "The {a} is superb in every way.", "I adore the {a} on this {p}.", "The {a} is flawless.",
    "Wow, the {a} is amazing.", "The {a} is the best I have ever come across.",
    "The {a} is brilliant and a joy to use.",
]
MILD_POS = [
    "The {a} is pretty good.", "I like the {a} quite a bit.", "The {a} is solid for everyday use.",
    "The {a} works well.", "The {a} is nice.", "The {a} is better than I expected for the price.",
    "I'm happy with the {a}.", "The {a} holds up well.", "The {a} is quite pleasant.",
    "The {a} does its job nicely.",
]
LUKEWARM = [
    "The {a} is just okay.", "The {a} is about average.", "The {a} is nothing special.",
    "The {a} is fine, I suppose.", "I have no strong feelings about the {a}.", "The {a} is so-so.",
    "The {a} is acceptable but forgettable.", "The {a} is middle of the road.",
    "The {a} is ordinary, neither great nor bad.",
]
MILD_NEG = [
    "The {a} is a bit disappointing.", "The {a} could be better.", "I'm not impressed with the {a}.",
    "The {a} is weaker than I hoped.", "The {a} feels somewhat cheap.", "The {a} is underwhelming.",
    "I expected more from the {a}.", "The {a} has some annoying flaws.", "The {a} is a little flimsy.",
]
STRONG_NEG = [
    "The {a} is absolutely terrible.", "The {a} is a complete disaster.", "The {a} is awful.",
    "I have never seen a worse {a}.", "The {a} is utterly useless.", "The {a} is horrible, a total waste.",
    "I hate the {a} on this {p}.", "The {a} is dreadful.", "The {a} is unbearably bad.",
    "The {a} is a nightmare to deal with.",
]
# the minority voice in a 4 (one gripe) or a 2 (one upside), framed as such
SMALL_GRIPE = [
    "My only small complaint is that the {a} could be better.",
    "If I had to nitpick, the {a} is a little weak.",
    "The {a} is slightly disappointing, but it's a minor issue.",
]
SMALL_UPSIDE = [
    "The only upside is that the {a} is decent.", "To be fair, the {a} is fine.",
    "The {a} is alright, but that doesn't save it.",
]
# a 3 can also say both in one breath
MIXED = [
    "The {a} is pretty good, but the {b} is a letdown.",
    "I like the {a}, although the {b} could be better.",
    "The {a} works well, while the {b} feels cheap.",
]
OPENERS = [
    "I bought this {p} {why}.", "I have been using this {p} for a few weeks now.",
    "My partner picked up this {p} {why}.", "I ordered the {brand} {p} {why}.",
    "I needed a new {p} {why}.", "I got this {p} as a gift.", "We tried this {p} {why}.",
    "I switched to this {p} last month.",
]
CLOSERS = {
    5: ["I would buy it again in a heartbeat.", "Highly recommended to everyone!", "Worth every penny.",
        "I can't imagine using anything else now."],
    4: ["Overall I'm happy with the purchase.", "I'd recommend it.", "Good value overall.",
        "It does the job nicely."],
    3: ["It's fine for the price, I guess.", "Not bad, not great.", "I might look at other options next time.",
        "It's an average product overall."],
    2: ["I probably won't buy it again.", "I regret this purchase a little.", "I wouldn't really recommend it.",
        "Not worth the money, in my opinion."],
    1: ["Avoid it at all costs.", "I'm returning it immediately.", "Save your money and look elsewhere.",
        "Worst purchase I have made in years."],
}
TITLES = {  # {p} product type, {a} the aspect mentioned first, {b} another aspect
    5: ["Absolutely love this {p}", "Best {p} I've owned", "Fantastic {a}", "Perfect in every way",
        "Outstanding {p}"],
    4: ["Solid {p}", "Good {p} with minor flaws", "Pretty good overall", "Nice {a}", "Happy with this {p}"],
    3: ["Decent but nothing special", "Mixed feelings about this {p}", "Just okay", "Average {p}",
        "Good {a}, weak {b}"],
    2: ["Disappointing {p}", "Not what I hoped for", "Expected more", "Underwhelming {a}"],
    1: ["Complete waste of money", "Terrible {p}", "Avoid this {p}", "Awful {a}"],
}


def _aspect_sentences(rng: random.Random, rating: int, aspects: list[str]) -> tuple[list[str], list[str]]:
    """(sentence templates with {a}/{b}, the aspects they talk about), in reading order."""
    pick = rng.choice
    if rating == 5:
        lines = [pick(STRONG_POS) for _ in range(rng.choice([2, 3]))]
        if rng.random() < 0.3:
            lines.insert(rng.randrange(1, len(lines) + 1), pick(MILD_POS))
    elif rating == 4:
        lines = [pick(MILD_POS) for _ in range(rng.choice([2, 3]))]
        if rng.random() < 0.5:
            lines.append(pick(SMALL_GRIPE))
    elif rating == 3:
        variant = rng.randrange(3)
        if variant == 0:
            lines = [pick(MILD_POS), pick(MILD_NEG), pick(LUKEWARM)]
        elif variant == 1:
            lines = [pick(MIXED), pick(LUKEWARM)]
        else:
            lines = [pick(LUKEWARM), pick(LUKEWARM), pick(MILD_POS + MILD_NEG)]
        rng.shuffle(lines)
    elif rating == 2:
        lines = [pick(MILD_NEG) for _ in range(rng.choice([2, 3]))]
        if rng.random() < 0.5:
            lines.insert(rng.randrange(0, len(lines) + 1), pick(SMALL_UPSIDE))
    else:
        lines = [pick(STRONG_NEG) for _ in range(rng.choice([2, 3]))]
        if rng.random() < 0.3:
            lines.insert(rng.randrange(1, len(lines) + 1), pick(MILD_NEG))
    # each sentence gets its own aspect ({b} of a MIXED line takes the next one)
    need = sum(2 if "{b}" in s else 1 for s in lines)
    chosen = rng.sample(aspects, need)
    out, it = [], iter(chosen)
    for s in lines:
        a = next(it)
        out.append(s.replace("{a}", a).replace("{b}", next(it)) if "{b}" in s else s.replace("{a}", a))
    return out, chosen


def generate_review(rng: random.Random, idx: int, rating: int | None = None) -> dict:
    ptype = rng.choice(sorted(PRODUCTS))
    aspects, reasons = PRODUCTS[ptype]
    brand = rng.choice(BRANDS)
    rating = rating if rating is not None else rng.randint(1, 5)
    body, used = _aspect_sentences(rng, rating, aspects)
    # "Also," between two sentences of the same register reads naturally and varies the rhythm
    for i in range(1, len(body)):
        if rating in (1, 5) and rng.random() < 0.25:
            body[i] = "Also, " + body[i][0].lower() + body[i][1:]
    sentences = []
    if rng.random() < 0.9:
        sentences.append(rng.choice(OPENERS).format(p=ptype, why=rng.choice(reasons), brand=brand))
    sentences += [s.replace("{p}", ptype) for s in body]
    if rng.random() < 0.7:
        sentences.append(rng.choice(CLOSERS[rating]))
    others = [a for a in aspects if a not in used[:1]]
    title = rng.choice(TITLES[rating]).format(p=ptype, a=used[0], b=used[1] if len(used) > 1 else rng.choice(others))
    return {"id": idx, "product": f"{brand} {ptype}", "rating": rating,
            "summary": title[0].upper() + title[1:], "text": " ".join(sentences)}


def generate_reviews(num_records: int, seed: int = 0) -> list[dict]:
    """num_records reviews with ratings 1-5 in equal shares, shuffled; a pure function of the seed."""
    rng = random.Random(seed)
    ratings = [1 + i % 5 for i in range(num_records)]
    rng.shuffle(ratings)
    return [generate_review(rng, i, r) for i, r in enumerate(ratings)]


def pretraining_texts(records: list[dict], fields=("summary", "text")) -> list[str]:
    """Raw review text for the base model's pretraining: "summary\\ntext" (the record's `fields`, a
    line each), no instructions. Pass the training split (or records from another seed) so
    evaluation texts stay unseen."""
    return ["\n".join(str(r[f]) for f in fields if f in r) for r in records]
