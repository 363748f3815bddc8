"""An independent reader of the app's sentences (issue 35): each sentence's claim re-derived from the numbers
printed in it, with nothing but the text. The same reader checks the verdict built in Python and the one
Chromium shows. A claim is accepted when the printed numbers allow it (ties at the printed precision allow
either word); a sentence no rule below recognises is a failure, so no sentence goes unchecked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NUM = r"[+-]?\d+(?:\.\d+)?"
PCT = rf"({NUM})%"
ORGANIZING = 0.2  # the verdict's documented level; re-stated here, not imported, so a change is a test change
ALPHA = 0.05


@dataclass
class Claim:
    sentence: str
    kind: str = ""
    problems: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)


def plain(text: str) -> str:
    """The text as written, from markdown or from what the browser renders (Streamlit's markdown turns
    '<=' into '≤' and '->' into '→')."""
    for shown, written in (("**", ""), ("≤", "<="), ("→", "->"), ("≥", ">="), ("−", "-")):
        text = text.replace(shown, written)
    return " ".join(text.split())


def split(text: str) -> list[str]:
    """A verdict's sentences: a period then a space then a capital, a digit or bold."""
    text = plain(text)
    return [s for s in re.split(r"(?<=\.) (?=[A-Z0-9])", text) if s]


def _f(x: str) -> float:
    return float(x)


def _tol(printed: str) -> float:
    """Half a unit of the last printed digit."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10**-decimals


def _p(text: str) -> tuple[float, bool]:
    """(p, bound) from 'p <= 0.05' (bound: the smallest p the permutations give) or 'p = 0.43'."""
    m = re.fullmatch(rf"p (<=|=) ({NUM})", text)
    return _f(m.group(2)), m.group(1) == "<="


def _probe(c: Claim, clause: str) -> None:
    m = re.search(rf"probe R2 ({NUM}), band ({NUM}) to ({NUM}), chance at most ({NUM})", clause)
    if not m:
        c.problems.append("probe clause without its numbers")
        return
    r2, lo, hi, top = (_f(g) for g in m.groups())
    t = _tol(m.group(4))
    c.numbers["probe"] = {"r2": r2, "lo": lo, "hi": hi, "top": top}
    if not lo - t <= r2 <= hi + t:
        c.problems.append("probe R2 outside its own band")
    if "is linearly decodable" in clause and not lo >= top - 2 * t:
        c.problems.append(f"'decodable' while the band's low end {lo} is under chance's top {top}")
    elif "is not linearly decodable" in clause and not hi <= top + 2 * t:
        c.problems.append(f"'not decodable' while the band's top {hi} is over chance's top {top}")
    elif "undecided" in clause and not (lo <= top + 2 * t and hi >= top - 2 * t):
        c.problems.append("'undecided' while the band clears chance on one side")


def _position(c: Claim, s: str) -> None:
    m = re.match(rf"Position explains {PCT} of the variance here ±{PCT} \(chance {PCT} ±{PCT}\)(.*)\.$", s)
    if not m:
        c.problems.append("R2 sentence without its band or chance's band")
        return
    c.numbers["r2_pos"] = {
        "r2": _f(m.group(1)) / 100,
        "half": _f(m.group(2)) / 100,
        "chance": _f(m.group(3)) / 100,
    }
    if m.group(5):
        _probe(c, m.group(5))


def _token(c: Claim, s: str) -> None:
    m = re.match(
        rf"Nearest neighbours in other branches share the current token {PCT} ±{PCT} of the time "
        rf"\(chance {PCT}, up to {PCT}\)\.$",
        s,
    )
    if not m:
        c.problems.append("same-token sentence without its band or chance's")
        return
    c.numbers["token_leak"] = {"leak": _f(m.group(1)) / 100, "chance": _f(m.group(3)) / 100}


def _factors(c: Claim, s: str) -> None:
    listed = re.search(
        r"\(above-chance scores, 0 chance to 1 perfect: (.*?)(?:; each band under [\d.]+)?\)\.$", s
    )
    if not listed:
        c.problems.append("factor sentence without the scores it decides on")
        return
    scores = {}
    for part in listed.group(1).split(", "):
        m = re.fullmatch(rf"(position|token identity|prompt|branch) ({NUM}) (?:±({NUM})|\(no band\))", part)
        if not m:
            c.problems.append(f"unreadable score {part!r}")
            return
        scores[m.group(1)] = (_f(m.group(2)), _f(m.group(3)) if m.group(3) else float("inf"))
    c.numbers["factors"] = scores
    t = 0.01  # two printed values at 2 decimals
    ranked = sorted(scores, key=lambda f: -scores[f][0])
    lo = {f: v[0] - v[1] for f, v in scores.items()}
    hi = {f: v[0] + v[1] for f, v in scores.items()}
    leader = ranked[0]
    clears_others = all(lo[leader] > hi[f] - t for f in ranked[1:])
    if s.startswith("This layer is organized by"):
        best = re.match(r"This layer is organized by (position|token identity|prompt|branch) \(", s).group(1)
        if best != leader and scores[best][0] < scores[leader][0] - t:
            c.problems.append(f"names {best}, not the top score")
        if lo[best] < ORGANIZING - t:
            c.problems.append(f"'organized by {best}' while its band reaches {lo[best]:.2f} < {ORGANIZING}")
        if any(lo[best] <= hi[f] - t for f in scores if f != best):
            c.problems.append(f"'organized by {best}' while another factor's band overlaps its own")
    elif s.startswith("No single factor"):
        if any(hi[f] >= ORGANIZING + t for f in scores):
            c.problems.append("'no single factor' while a band reaches the organizing level")
    elif s.startswith("No factor clearly leads"):
        named = re.split(
            r", | and ", re.match(r"No factor clearly leads: the bands of (.*?) overlap", s).group(1)
        )
        if len(named) < 2 or any(hi[f] < lo[leader] - t for f in named):
            c.problems.append("'bands overlap' while a named band stays under the leader's")
        if clears_others and all(f == leader or hi[f] < lo[leader] - t for f in scores):
            c.problems.append("'no clear leader' while the leader's band clears every other")
    elif " leads, but its band reaches below" in s:
        best = re.match(r"(position|token identity|prompt|branch) leads", s).group(1)
        if best != leader or not clears_others:
            c.problems.append(f"'{best} leads' while another factor's band overlaps its own")
        if lo[leader] > ORGANIZING + t:
            c.problems.append("'band reaches below' while it does not")
    else:
        c.problems.append("factor sentence with an unknown claim")


def _means_test(c: Claim, s: str) -> None:
    m = re.search(
        rf"\((p (?:<=|=) {NUM})(?: at level ({NUM}))?, held-out R2 ({NUM}) against ({NUM}) by chance\)", s
    )
    if not m:
        c.problems.append("test sentence without p, held-out R2 and its null")
        return
    p, _ = _p(m.group(1))
    alpha = _f(m.group(2)) if m.group(2) else ALPHA
    r2, null = _f(m.group(3)), _f(m.group(4))
    c.numbers["test"] = {"p": p, "alpha": alpha, "r2": r2, "null": null}
    significant = p <= alpha + 1e-9
    if s.startswith("No ") and significant:
        c.problems.append("'not detected' beside a significant p")
    if "was detected" in s and not (significant and r2 > 0):
        c.problems.append("'detected' without a significant p and a held-out R2 above 0")
    if "test was significant" in s and not (significant and r2 <= 0 + 0.0005):
        c.problems.append("'significant but too small' while p or R2 say otherwise")


def _linear(c: Claim, s: str) -> None:
    m = re.search(
        rf"\((?:[^()]*: )?(p (?:<=|=) {NUM}) at level ({NUM}), probe R2 ({NUM}) against ({NUM}) at most by "
        r"chance\)",
        s,
    )
    if not m:
        c.problems.append("linear test sentence without its numbers")
        return
    p, _ = _p(m.group(1))
    level, r2, top = _f(m.group(2)), _f(m.group(3)), _f(m.group(4))
    passed = p <= level + 1e-9 and r2 > 0
    if "was erased" in s and not passed:
        c.problems.append("'erased' without a passed linear test")
    if "was subtracted" in s:
        w = re.search(rf"rank-\d+ component at weight ({NUM})", s)
        if not passed:
            c.problems.append("'subtracted' without a passed linear test")
        if not w or not 0 < _f(w.group(1)) <= 1:
            c.problems.append("a low-rank subtraction without a weight in (0, 1]")
    if "reads position across prompts" in s and not passed:
        c.problems.append("'reads position' without a passed linear test")
    if "finds no position" in s and passed and r2 > top:
        c.problems.append("'finds no position' beside a passed linear test")


def _change(c: Claim, s: str) -> None:
    m = re.search(
        rf"went {PCT} ±{PCT} \(chance {PCT} ±{PCT}\) -> {PCT} ±{PCT} \(chance {PCT} ±{PCT}\), "
        rf"band of the change ±{PCT}: (.*)\.$",
        s,
    )
    if not m:
        c.problems.append("variance sentence without its numbers")
        return
    r, hr, cr, ccr, a, ha, ca, cca, ch = (_f(g) for g in m.groups()[:9])
    word, t = m.group(10), 0.1  # percent points: two values printed at 0.1
    c.numbers["variance"] = {"raw": r, "after": a}
    rose, unchanged = a > r + ch - t, abs(a - r) <= ch + t
    at_chance_before, at_chance = r - hr <= cr + ccr + t, a - ha <= ca + cca + t
    if word == "it rose" and not rose:
        c.problems.append("'rose' within the band of the change")
    elif word == "it was at chance before" and not at_chance_before:
        c.problems.append("'at chance before' while raw's band clears chance's")
    elif word == "down to chance" and not at_chance:
        c.problems.append("'down to chance' while the band after clears chance's")
    elif word == "unchanged within its band" and not unchanged:
        c.problems.append("'unchanged' beyond the band of the change")
    elif word.endswith("of its above-chance part went"):
        g = re.match(rf"({NUM})% ±({NUM})% of its above-chance part went", word)
        gone = 1 - (a - ca) / (r - cr) if r != cr else float("nan")
        if not g or abs(gone * 100 - _f(g.group(1))) > 2 or at_chance or rose:
            c.problems.append(f"share gone {word!r} does not follow from the numbers (about {gone:.0%})")
    elif word not in ("it rose", "it was at chance before", "down to chance", "unchanged within its band"):
        c.problems.append(f"unknown verdict on the change: {word!r}")


def _smaller_whole(c: Claim, s: str) -> None:
    m = re.search(
        rf"took {PCT} of the variance, and the variance per-position means explain went "
        rf"({NUM})% ±({NUM})% -> ({NUM})% ±({NUM})% "
        rf"of the raw view's variance \(band of the change ±({NUM})%\): (.*)\.$",
        s,
    )
    if not m:
        c.problems.append("smaller-whole sentence without its numbers")
        return
    before, after, band = _f(m.group(2)), _f(m.group(4)), _f(m.group(6))
    decimals = len(m.group(2).split(".")[1]) if "." in m.group(2) else 0
    word, t = m.group(7), 1.5 * 10**-decimals  # three values printed at this many decimals
    grew, fell = after > before + band - t, after < before - band + t
    if word == "it grew as well" and not grew:
        c.problems.append("'grew' within the band of the change")
    elif word.startswith("it fell") and not fell:
        c.problems.append("'fell' within the band of the change")
    elif word.startswith("unchanged within its band") and (
        after > before + band + t or after < before - band - t
    ):
        c.problems.append("'unchanged' beyond the band of the change")
    elif not word.startswith(("it grew", "it fell", "unchanged within its band")):
        c.problems.append(f"unknown verdict on the positional variance: {word!r}")


def _leak(c: Claim, s: str) -> None:
    m = re.search(rf"went ({NUM}) ±({NUM}) -> ({NUM}) ±({NUM}), chance 0 ±({NUM})\.$", s)
    if not m:
        c.problems.append("leak sentence without bands")


def _token_after(c: Claim, s: str) -> None:
    m = re.search(
        rf"share the current token {PCT} ±{PCT} -> {PCT} ±{PCT} of the time \(chance {PCT}, up to {PCT}\)"
        r"(?:: (.*))?\.$",
        s,
    )
    if not m:
        c.problems.append("same-token change without its numbers")
        return
    a, ha, top = _f(m.group(3)), _f(m.group(4)), _f(m.group(6))
    if m.group(7) == "down to chance" and a - ha > top + 0.1:
        c.problems.append("'down to chance' while the band after clears chance's")
    if m.group(7) and m.group(7).endswith("is left") and a - ha <= top - 0.1:
        c.problems.append("'is left' while the band after reaches chance")


RULES: list[tuple[str, object]] = [
    (r"^Position explains ", _position),
    (r"^Nearest neighbours in other branches share ", _token),
    (r"^(This layer is organized by|No single factor|No factor clearly leads|\w[\w ]* leads, but)", _factors),
    (
        r"^(A|An) [\w ]+ component was detected \(|^The [\w ]+ test was significant \(|^No [\w ]+ component detected ",
        _means_test,
    ),
    (
        r"^(Position that a linear probe reads|A linear probe finds no position|A linear probe reads position)",
        _linear,
    ),
    (r"^After removing .*, position's share of the variance went ", _change),
    (
        r"^Removing .* took .* of the variance, and the variance per-position means explain went ",
        _smaller_whole,
    ),
    (r"^After removing .*, the kNN position leak went ", _leak),
    (r"^After removing .*, neighbours in other branches share the current token ", _token_after),
    (r"^Removal of .* forced, whatever the tests found\.$", lambda c, s: None),
    (r"^\d+ of \d+ tokens sit where the other folds have no data", lambda c, s: None),
]


def read(sentence: str) -> Claim:
    """The claim a sentence makes, checked against its own numbers."""
    c = Claim(sentence)
    for pattern, rule in RULES:
        if re.search(pattern, sentence):
            c.kind = rule.__name__.strip("_") if hasattr(rule, "__name__") else pattern
            rule(c, sentence)
            return c
    c.problems.append("no rule reads this sentence")
    return c


def read_all(text_or_sentences: str | list[str], known_notes: tuple[str, ...] = ()) -> list[Claim]:
    """Every sentence read; sentences equal to a removal note the caller passes (free text from a
    method, quoted as is) are accepted without a rule."""
    sentences = (
        split(text_or_sentences)
        if isinstance(text_or_sentences, str)
        else [plain(s) for s in text_or_sentences]
    )
    notes = {n[0].upper() + n[1:] + "." for n in known_notes if n}
    return [Claim(s, "note") if s in notes else read(s) for s in sentences]
