"""A small caption grammar with synonyms and paraphrases: varied human-style descriptions of a clip.

``describe(actor, color, action, scene, n, rng)`` draws ``n`` distinct captions such as
"a red ball rolls to the left", "someone moves a red circle leftwards" or
"on the beach, a crimson disc slides left". Some captions omit the colour or the scene, as human
annotators do.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NOUNS", "COLOR_WORDS", "VERBS", "GERUNDS", "TRANSITIVE", "SCENE_PHRASES", "describe"]

NOUNS: dict[str, list[str]] = {
    "circle": ["ball", "circle", "disc", "round ball", "sphere", "dot"],
    "square": ["square", "box", "block", "cube", "tile"],
    "triangle": ["triangle", "pyramid", "triangular shape", "wedge"],
    "diamond": ["diamond", "rhombus", "kite", "diamond shape"],
    "star": ["star", "star shape", "little star", "starlet"],
    "face": ["face", "smiley face", "smiley", "head", "little face"],
    "car": ["car", "toy car", "vehicle", "automobile", "little car"],
}
COLOR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson", "bright red"], "orange": ["orange", "bright orange"], "yellow": ["yellow", "golden"],
    "green": ["green", "bright green"], "blue": ["blue", "dark blue"], "purple": ["purple", "violet"],
    "pink": ["pink", "rosy"], "brown": ["brown", "chocolate"], "grey": ["grey", "gray"], "cyan": ["cyan", "turquoise"],
}
VERBS: dict[str, list[str]] = {
    "move-left": ["moves to the left", "moves left", "goes left", "slides to the left", "travels leftwards",
                  "drifts to the left", "rolls to the left", "heads left"],
    "move-right": ["moves to the right", "moves right", "goes right", "slides to the right", "travels rightwards",
                   "drifts to the right", "rolls to the right", "heads right"],
    "move-up": ["moves up", "rises", "goes upwards", "floats up", "climbs up", "drifts upwards"],
    "move-down": ["moves down", "falls", "drops down", "sinks", "goes downwards", "slides down"],
    "grow": ["grows", "gets bigger", "becomes larger", "expands", "increases in size", "swells up"],
    "shrink": ["shrinks", "gets smaller", "becomes smaller", "contracts", "decreases in size", "dwindles"],
    "rotate": ["rotates", "spins", "turns around", "spins around", "twirls", "revolves"],
    "bounce": ["bounces", "jumps", "hops up and down", "bounces up and down", "leaps", "jumps around"],
    "appear": ["appears", "shows up", "pops up", "comes into view", "emerges", "materializes"],
    "disappear": ["disappears", "vanishes", "fades away", "goes out of view", "is gone", "vanishes from sight"],
}
GERUNDS: dict[str, list[str]] = {
    "move-left": ["moving to the left", "going left", "sliding left", "rolling to the left"],
    "move-right": ["moving to the right", "going right", "sliding right", "rolling to the right"],
    "move-up": ["moving up", "rising", "floating upwards", "climbing"],
    "move-down": ["moving down", "falling", "dropping", "sinking"],
    "grow": ["growing", "getting bigger", "expanding", "growing larger"],
    "shrink": ["shrinking", "getting smaller", "contracting", "shrinking down"],
    "rotate": ["rotating", "spinning", "turning around", "twirling"],
    "bounce": ["bouncing", "jumping", "hopping", "bouncing up and down"],
    "appear": ["appearing", "showing up", "popping up", "coming into view"],
    "disappear": ["disappearing", "vanishing", "fading away", "going away"],
}
TRANSITIVE: dict[str, list[str]] = {
    "move-left": ["someone moves {np} to the left", "somebody pushes {np} leftwards", "a person slides {np} left"],
    "move-right": ["someone moves {np} to the right", "somebody pushes {np} rightwards",
                   "a person slides {np} right"],
    "move-up": ["someone lifts {np} up", "somebody raises {np}", "a person pulls {np} upwards"],
    "move-down": ["someone drops {np}", "somebody lowers {np}", "a person pushes {np} down"],
    "grow": ["someone makes {np} bigger", "somebody enlarges {np}", "a person inflates {np}"],
    "shrink": ["someone makes {np} smaller", "somebody shrinks {np}", "a person squeezes {np}"],
    "rotate": ["someone spins {np}", "somebody rotates {np}", "a person turns {np} around"],
    "bounce": ["someone bounces {np}", "somebody makes {np} jump", "a person bounces {np} up and down"],
    "appear": ["someone places {np} on the screen", "somebody reveals {np}", "a person shows {np}"],
    "disappear": ["someone removes {np}", "somebody hides {np}", "a person takes {np} away"],
}
SCENE_PHRASES: dict[str, list[str]] = {
    "meadow": ["in a meadow", "on the grass", "in a green field"],
    "beach": ["on the beach", "on the sand", "at the beach"],
    "sea": ["over the sea", "above the water", "by the sea"],
    "room": ["in a room", "indoors", "inside a room"],
    "night": ["at night", "under the night sky", "in the dark"],
    "snowfield": ["in the snow", "on a snowy field", "in winter"],
    "forest": ["in a forest", "among the trees", "in the woods"],
}

_TEMPLATES = [
    "{NP} {V}", "{NP} {V} {S}", "{S}, {np} {V}", "{NP} is {G}", "{NP} is {G} {S}", "there is {np} {G} {S}",
    "a video of {np} {G}", "{T}", "{T} {S}", "we see {np} {G}", "{np_bare} {V}", "here {np} {V}",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _one(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _caption(actor: str, color: str, action: str, scene: str, rng: np.random.Generator) -> str:
    noun = _one(rng, NOUNS[actor])
    adj = _one(rng, COLOR_WORDS[color]) if rng.random() < 0.85 else ""
    head = f"{adj} {noun}".strip()
    det = _one(rng, [_article(head), "the", "one"]) if rng.random() < 0.3 else _article(head)
    np_ = f"{det} {head}"
    template = _one(rng, _TEMPLATES)
    text = template.format(
        NP=np_, np=np_, np_bare=head, V=_one(rng, VERBS[action]), G=_one(rng, GERUNDS[action]),
        S=_one(rng, SCENE_PHRASES[scene]), T=_one(rng, TRANSITIVE[action]).format(np=np_),
    )
    return text


def describe(actor: str, color: str, action: str, scene: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct lower-case captions of one clip (raises if the grammar cannot produce ``n``)."""
    for table, key in ((NOUNS, actor), (COLOR_WORDS, color), (VERBS, action), (SCENE_PHRASES, scene)):
        if key not in table:
            raise KeyError(f"the caption grammar has no words for {key!r}")
    out: dict[str, None] = {}
    for _ in range(50 * n):
        out[_caption(actor, color, action, scene, rng)] = None
        if len(out) == n:
            return list(out)
    raise ValueError(f"could only draw {len(out)} distinct captions, {n} requested")
