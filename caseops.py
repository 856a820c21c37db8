"""CaseOps: a lossless case-folding transform of text, so that a tokenizer's pieces need not
spend vocabulary on capitalised copies of words.

Over each maximal run of ASCII letters:
    all lower case          unchanged                    "word"   -> "word"
    Title case              TITLE + lower case           "Word"   -> "\ue001word"
    ALL CAPS (>= 2 letters) ALLCAPS + lower case         "WORD"   -> "\ue002word"
    mixed                   TITLE if the first letter is upper, then UPPER before every later
                            capital                      "iPhone" -> "i\ue003phone"
A literal operator character (U+E001..U+E004) in the text is escaped as ESCAPE + itself.
decode() inverts encode() exactly. original_bytes() gives, for every character of the encoded
text, how many UTF-8 bytes of the original text it stands for (operators 0), so that the bytes
a token covers, and so val_bpb, are counted on the original text.

This is the transform alone; the tokenizer and the shard export with byte sidecars are to come
(issue: CaseOps end to end).
"""

import re

TITLE, ALLCAPS, UPPER, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, UPPER, ESCAPE)
_LETTER_RUN = re.compile(r"[A-Za-z]+")
_OPERATOR = re.compile("[\ue001-\ue004]")


def _encode_run(run: str) -> str:
    if run.islower():
        return run
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + run.lower()
    out = [TITLE + run[0].lower() if run[0].isupper() else run[0]]
    out += [UPPER + c.lower() if c.isupper() else c for c in run[1:]]
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps form of text: operators escaped first, then every letter run case-folded."""
    escaped = _OPERATOR.sub(lambda m: ESCAPE + m.group(), text)
    return _LETTER_RUN.sub(lambda m: _encode_run(m.group()), escaped)


def decode(encoded: str) -> str:
    """The original text of encode()'s output."""
    out, i, n = [], 0, len(encoded)
    while i < n:
        c = encoded[i]
        if c == ESCAPE and i + 1 < n:
            out.append(encoded[i + 1])
            i += 2
        elif c in (TITLE, UPPER) and i + 1 < n:
            out.append(encoded[i + 1].upper())
            i += 2
        elif c == ALLCAPS:
            run = _LETTER_RUN.match(encoded, i + 1)
            end = run.end() if run else i + 1
            out.append(encoded[i + 1 : end].upper())
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def original_bytes(encoded: str) -> list[int]:
    """Per character of encoded text: the UTF-8 bytes of the original text it stands for. An
    operator stands for none (a case change adds no byte); an escaped operator character for its
    own 3 bytes; everything else for its own UTF-8 length. Sums to len(decode(encoded) in UTF-8)."""
    counts, escaped = [], False
    for c in encoded:
        if escaped:
            counts.append(len(c.encode("utf-8")))
            escaped = False
        elif c in OPERATORS:
            counts.append(0)
            escaped = c == ESCAPE
        else:
            counts.append(len(c.encode("utf-8")))
    return counts
