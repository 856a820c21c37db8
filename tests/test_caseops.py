"""caseops.py: the case-folding transform inverts exactly, and its byte counts are the
original text's."""

import random
import sys

import pytest

from conftest import ROOT, synthetic_documents

sys.path.insert(0, str(ROOT))
import caseops as co  # noqa: E402

T, A, U, E = co.TITLE, co.ALLCAPS, co.UPPER, co.ESCAPE


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("word", "word"),
        ("Word", T + "word"),
        ("WORD", A + "word"),
        ("A", T + "a"),
        ("iPhone", "i" + U + "phone"),
        ("McDonald", T + "mc" + U + "donald"),
        ("HELLOworld", T + "h" + U + "e" + U + "l" + U + "l" + U + "o" + "world"),
        ("The NASA iPhone, 3D!", T + "the " + A + "nasa i" + U + "phone, 3" + T + "d!"),
        ("Éric über ÉCOLE", "É" + "ric über É" + A + "cole"),  # only ASCII letters fold
        ("x" + E + "y" + T, "x" + E + E + "y" + E + T),  # literal operators are escaped
    ],
)
def test_encode_examples_and_inverse(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


def _random_text(rng: random.Random, length: int) -> str:
    pools = ["abcxyz", "ABCXYZ", " \n\t.,-'0123", "éÉßüΩж東京🙂𝔘", "".join(co.OPERATORS)]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(length))


def test_inverse_and_byte_counts_on_random_unicode():
    rng = random.Random(0)
    for _ in range(3000):
        text = _random_text(rng, rng.randint(0, 40))
        encoded = co.encode(text)
        assert co.decode(encoded) == text, repr(text)
        assert not any("A" <= c <= "Z" for c in encoded)  # no capital letter is left to tokenize
        counts = co.original_bytes(encoded)
        assert len(counts) == len(encoded) and sum(counts) == len(text.encode("utf-8")), repr(text)


def test_inverse_on_real_text():
    """Every paragraph of this project's README and source, and synthetic documents."""
    docs = [p for path in ("README.md", "train_gpt.py") for p in (ROOT / path).read_text().split("\n\n")]
    docs += synthetic_documents(200, seed=3)
    for doc in docs:
        encoded = co.encode(doc)
        assert co.decode(encoded) == doc
        assert sum(co.original_bytes(encoded)) == len(doc.encode("utf-8"))
    folded = sum(co.encode(d).count(T) + co.encode(d).count(A) + co.encode(d).count(U) for d in docs)
    assert folded > 1000  # the sample really exercises the case operators
