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


# ---------------------------------------------------------------------------------------------
# The export: tokenizer, shards, byte sidecars
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

import train_gpt as tg  # noqa: E402
from tiny_data import QUICK_RUN_ENV  # noqa: E402

EXPORT_VOCAB = 400


def caseops_documents(n, seed):
    """Synthetic documents with every case pattern, literal operators, a character outside any
    vocabulary (byte fallback), and whitespace that the tokenizer's normalisation collapses."""
    rng = random.Random(seed)
    extras = ["NASA and the GPU", "iPhone McDonald", f"a literal {T} and {E}{A}", "emoji \U0001F600 here", "Ünïcödé Straße", "two  spaces\nand a newline"]
    return [f"{d} {rng.choice(extras)} {d.upper()[:20]}." for d in synthetic_documents(n, seed)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops")
    docs = caseops_documents(260, seed=5)
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "out"
    co.export(path, out, vocab_size=EXPORT_VOCAB, val_docs=40, tokenizer_docs=200, shard_tokens=3000, workers=2, batch_docs=16)
    return docs, path, out


def _normalised(sp, text):
    """The text a tokenizer encodes: its normalisation, with its space symbol as a space."""
    return sp.normalize(text).replace("\u2581", " ")


def test_export_writes_the_challenge_layout_with_bos_and_sidecars(exported):
    docs, _, out = exported
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / f"fineweb_{EXPORT_VOCAB}_bpe.model"))
    assert [sp.id_to_piece(sp.piece_to_id(op)) for op in co.OPERATORS] == list(co.OPERATORS)  # user-defined symbols
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    h = tg.Hyperparameters(data_dir=str(out), vocab_size=EXPORT_VOCAB)
    val_files, train_files = tg.find_shards(h, "val"), tg.find_shards(h, "train")
    assert len(val_files) >= 2 and len(train_files) >= 2  # shard_tokens=3000 cuts several
    val = np.concatenate([tg.read_shard(f) for f in val_files])
    train = np.concatenate([tg.read_shard(f) for f in train_files])
    assert (val == tg.BOS_ID).sum() == 40 and (train == tg.BOS_ID).sum() == 220 and val[0] == train[0] == tg.BOS_ID
    for f in val_files + train_files:
        assert tg.read_shard(f)[0] == tg.BOS_ID  # shards end at document boundaries
    # the documents come back exactly (up to the tokenizer's normalisation), in order
    starts = list(np.flatnonzero(val == tg.BOS_ID)) + [len(val)]
    decoded = [co.decode(sp.decode(val[a + 1 : b].tolist())) for a, b in zip(starts, starts[1:])]
    assert decoded == [_normalised(sp, d) for d in docs[:40]]
    # the sidecar: 0 for BOS, and per document the UTF-8 length of its (normalised) text
    counts = np.concatenate([tg.read_shard(tg.sidecar_path(f)) for f in val_files]).astype(np.int64)
    assert len(counts) == len(val) and (counts[val == tg.BOS_ID] == 0).all()
    per_doc = [int(counts[a:b].sum()) for a, b in zip(starts, starts[1:])]
    assert per_doc == [len(_normalised(sp, d).encode("utf-8")) for d in docs[:40]]
    plain = [i for i, d in enumerate(docs[:40]) if "  " not in d and "\n" not in d]
    assert plain and all(per_doc[i] == len(docs[i].encode("utf-8")) for i in plain)  # where normalisation changes nothing: the raw text's bytes


def test_byte_counter_counts_operators_escapes_and_byte_fallback():
    sp = spm.SentencePieceProcessor(model_proto=co.train_tokenizer(caseops_documents(200, seed=1), EXPORT_VOCAB, character_coverage=1.0))
    counter = co.ByteCounter(sp)
    for text in ["The NASA iPhone.", f"{T}{A}{E} literal", "\U0001F600 x \U0001F680", "Ünï", "ABC DEF gHi"]:
        ids = sp.encode(co.encode(text))
        assert sum(counter.counts(ids)) == len(_normalised(sp, text).encode("utf-8")), text
    ids = sp.encode(co.encode("\U0001F680"))  # in no training document
    assert all(sp.is_byte(i) for i in ids[-4:]) and counter.counts(ids)[-4:] == [1, 1, 1, 1]  # 4 fallback bytes
    ids = sp.encode(co.encode("Word"))
    assert sp.id_to_piece(ids[0]) == T and counter.counts(ids)[0] == 0


def test_train_gpt_reads_the_sidecar_and_bpb_divides_by_the_original_bytes(exported):
    docs, _, out = exported
    h = tg.Hyperparameters(data_dir=str(out), vocab_size=EXPORT_VOCAB, eval_seq_len=32)
    files = tg.find_shards(h, "val")
    tokens = tg.load_validation_tokens(files, 32, EXPORT_VOCAB)
    sidecar = tg.load_validation_byte_sidecars(files, len(tokens))
    sp = tg.load_tokenizer(tg.tokenizer_path(h), EXPORT_VOCAB)
    target_bytes = tg.validation_target_bytes(tokens, tg.build_byte_tables(sp), sidecar)
    ids = tokens.tolist()
    starts = [i for i, t in enumerate(ids) if t == tg.BOS_ID] + [len(ids)]
    direct = sum(len(co.decode(sp.decode(ids[a + 1 : b])).encode("utf-8")) for a, b in zip(starts, starts[1:]))
    assert int(target_bytes.sum()) == direct  # targets are tokens 1..; the cut tail's bytes left out alike
    tables = tg.validation_target_bytes(tokens, tg.build_byte_tables(sp))
    assert int(tables.sum()) != direct  # the pieces' own bytes would count operators as 3 bytes each


def test_export_resumes_to_the_same_files_and_refuses_foreign_folders(exported, tmp_path, monkeypatch):
    _, path, complete = exported
    out = tmp_path / "out"
    calls, real = [0], tg.shard_bytes

    def failing(tokens):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt  # killed after the first shards were written
        return real(tokens)

    monkeypatch.setattr(tg, "shard_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        co.export(path, out, vocab_size=EXPORT_VOCAB, val_docs=40, tokenizer_docs=200, shard_tokens=3000, workers=2, batch_docs=16)
    monkeypatch.setattr(tg, "shard_bytes", real)
    state = json.loads((out / co.STATE_FILE).read_text())
    assert 0 < state["docs_done"] < 260 and not state["complete"]
    co.export(path, out, vocab_size=EXPORT_VOCAB, val_docs=40, tokenizer_docs=200, shard_tokens=3000, workers=2, batch_docs=16)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(complete) for p in complete.rglob("*") if p.is_file())
    for f in files:
        if f.name != co.STATE_FILE:
            assert (out / f).read_bytes() == (complete / f).read_bytes(), f
    with pytest.raises(SystemExit, match="other settings"):
        co.export(path, out, vocab_size=EXPORT_VOCAB, val_docs=41, tokenizer_docs=200, shard_tokens=3000, workers=2, batch_docs=16)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="refusing to write into it"):
        co.export(path, tmp_path / "foreign", vocab_size=EXPORT_VOCAB, val_docs=40)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n["no"]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object"):
        list(co.read_documents(bad))


def test_training_runs_on_an_export(exported, tmp_path, monkeypatch):
    _, _, out = exported
    env = {**QUICK_RUN_ENV, "DATA_DIR": str(out), "VOCAB_SIZE": str(EXPORT_VOCAB), "ITERATIONS": "4", "WARMUP_STEPS": "0", "TTT_ENABLED": "0", "QUANT_ALLOC_SEQS": "0", "PACK_CODE": "0", "ARTIFACT_TARGET_BYTES": "0", "EVAL_STRIDE": "32", "OUT_DIR": str(tmp_path), "RUN_ID": "caseops"}
    h = tg.Hyperparameters.from_env(env)
    monkeypatch.chdir(tmp_path)
    lines = []
    files = tg.RunFiles.of(h)  # submission.json and the artifact land in tmp_path/caseops/
    files.folder.mkdir()
    tg.run(h, tg.Runtime(0, 1, 0, tg.torch.device("cpu")), lines.append, files)
    assert any("bytes (from the byte sidecars)" in line for line in lines) and "final val_bpb" in lines[-1]


def test_documents_come_back_from_plain_shards(tiny_data, tmp_path):
    root, _ = tiny_data
    out = tmp_path / "docs.jsonl"
    co.docs_from_shards(root, out, vocab_size=320)
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert docs[:50] == synthetic_documents(50, seed=99)  # the validation shard's documents first
    assert len(docs) == 50 + 2 * 600
