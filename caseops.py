"""CaseOps: a lossless case-folding transform of text, so that a tokenizer's pieces need not
spend vocabulary on capitalised copies of words, and the data tool that exports a CaseOps
dataset in the challenge's layout.

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

The export (documents as .jsonl of {"text": ...} -> DATA_DIR layout):

    python3 caseops.py export docs.jsonl OUT_DIR [--val-docs 50000] [--workers 8]
    python3 caseops.py docs-from-shards DATA_DIR docs.jsonl   # documents back from plain sp shards

writes OUT_DIR/tokenizers/fineweb_8192_bpe.model (sentencepiece BPE trained on the CaseOps form
of training documents, the challenge's settings plus the four operators as user-defined
symbols), OUT_DIR/datasets/fineweb10B_sp8192/fineweb_{val,train}_NNNNNN.bin ([BOS] + ids per
document, the first --val-docs documents are validation) and fineweb_val_bytes_NNNNNN.bin (per
validation token, the bytes of original text it covers), so that train_gpt.py runs on it with
DATA_DIR=OUT_DIR unchanged.

Which bytes count: those of the text the tokenizer encodes, i.e. after its normalisation
(nmt_nfkc: NFKC, whitespace runs and newlines collapsed to one space), the same text whose
bytes the plain tokenizer's piece tables count. So plain and CaseOps val_bpb divide by the
same bytes, and neither counts a byte the tokens do not encode.
"""

import argparse
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

import train_gpt as tg

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
    return list(_original_bytes(encoded))


def _original_bytes(chars):
    escaped = False
    for c in chars:
        if c in OPERATORS and not escaped:
            yield 0
            escaped = c == ESCAPE
        else:
            yield len(c.encode("utf-8"))
            escaped = False


# ---------------------------------------------------------------------------------------------
# Tokenizer and byte sidecar
# ---------------------------------------------------------------------------------------------

# The challenge's sentencepiece settings (read from the development sp8192 model's proto, which was
# trained with them): BPE, byte fallback, digits
# split, nmt_nfkc normalisation, no dummy prefix, pad/bos/eos/unk = 0/1/2/3, coverage 0.999.
TOKENIZER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999,
    hard_vocab_limit=False, max_sentence_length=65536, minloglevel=2,
)


def train_tokenizer(documents, vocab_size: int, caseops: bool = True, **overrides) -> bytes:
    """A serialized sentencepiece model trained on documents (their CaseOps form, with the four
    operators as user-defined symbols, if caseops) with TOKENIZER_SETTINGS."""
    import sentencepiece as spm

    model = io.BytesIO()
    texts = (encode(d) if caseops else d for d in documents)
    symbols = list(OPERATORS) if caseops else []
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t.replace("\n", " ") for t in texts),  # one document per "sentence"
        model_writer=model, vocab_size=vocab_size, user_defined_symbols=symbols, **{**TOKENIZER_SETTINGS, **overrides},
    )
    return model.getvalue()


class ByteCounter:
    """Per token of a CaseOps tokenizer, the UTF-8 bytes of original text it covers: control and
    unknown tokens 0, byte-fallback tokens 1, other pieces the original bytes of their surface
    ('\\u2581' is a space; a leading one after a control token is not in the text, as in the
    plain tokenizer's tables), operators 0 unless escaped."""

    BYTE = "\x00"  # stands in for a byte-fallback token: one byte, not an operator

    def __init__(self, sp):
        n = sp.vocab_size()
        self.control = [sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(n)]
        self.surface = ["" if self.control[i] else self.BYTE if sp.is_byte(i) else sp.id_to_piece(i).replace("\u2581", " ") for i in range(n)]

    def counts(self, ids) -> list[int]:
        """Byte counts of a document's ids (without its BOS; the document starts after a control token).
        The surfaces are read as one text, so an escape in one token applies to the next."""
        texts, after_control = [], True
        for i in ids:
            text = self.surface[i]
            texts.append(text[1:] if after_control and text.startswith(" ") else text)
            after_control = self.control[i]
        per_char = _original_bytes("".join(texts))
        return [sum(itertools.islice(per_char, len(t))) for t in texts]


# ---------------------------------------------------------------------------------------------
# Export: documents -> tokenizer, shards, validation byte sidecars
# ---------------------------------------------------------------------------------------------

STATE_FILE = "export_state.json"


def read_documents(path: Path, skip: int = 0):
    """The "text" of every line of a .jsonl file, from document `skip` on."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n < skip:
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n + 1}: not a JSON object with a \"text\" field") from None


_worker = None  # (sentencepiece processor, ByteCounter) of a worker process


def _init_worker(model_path: str):
    global _worker
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    _worker = (sp, ByteCounter(sp))


def _encode_batch(args):
    """[BOS] + ids of each document of the batch, concatenated; with_bytes: their byte counts."""
    docs, with_bytes = args
    sp, counter = _worker
    ids, counts = [], []
    for doc_ids in sp.encode([encode(d) for d in docs]):
        ids += [tg.BOS_ID] + doc_ids
        if with_bytes:
            counts += [0] + counter.counts(doc_ids)
    return np.array(ids, np.uint16), (np.array(counts, np.uint16) if with_bytes else None), len(docs), with_bytes


class Progress:
    """One self-overwriting line on stderr, at most every 2 seconds."""

    def __init__(self, label: str):
        self.label, self.docs, self.tokens, self.t0, self.shown = label, 0, 0, time.time(), 0.0

    def add(self, docs: int, tokens: int):
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        if time.time() - self.shown > 2:
            self.shown = time.time()
            print(f"\r{self.label}: {self.docs:,} documents, {self.tokens:,} tokens, {self.docs / (self.shown - self.t0 + 1e-9):,.0f} docs/s", end="", file=sys.stderr, flush=True)

    def done(self):
        print(f"\r{self.label}: {self.docs:,} documents, {self.tokens:,} tokens in {time.time() - self.t0:.0f}s" + " " * 20, file=sys.stderr, flush=True)


def export(docs_path: Path, out: Path, vocab_size: int = 8192, val_docs: int = 50_000, tokenizer_docs: int = 200_000, shard_tokens: int = 100_000_000, workers: int = 0, batch_docs: int = 256) -> dict:
    """Writes a CaseOps dataset in the challenge's layout (see the module docstring). Shards end
    at batch boundaries, at most shard_tokens tokens (unless one batch is larger). Resumable:
    progress is kept in OUT/export_state.json after every shard, and a rerun with the same
    arguments continues from there. Refuses a non-empty OUT that it did not start."""
    settings = dict(docs=str(docs_path.resolve()), docs_bytes=docs_path.stat().st_size, vocab_size=vocab_size, val_docs=val_docs, tokenizer_docs=tokenizer_docs, shard_tokens=shard_tokens, batch_docs=batch_docs)
    state_path = out / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["settings"] != settings:
            raise SystemExit(f"{out}: holds an export with other settings ({state_path}); choose another OUT_DIR")
        if state["complete"]:
            print(f"{out}: export already complete", file=sys.stderr)
            return state
        print(f"{out}: resuming after {state['docs_done']:,} documents", file=sys.stderr)
    elif out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty and not an export in progress; refusing to write into it")
    else:
        state = dict(settings=settings, docs_done=0, shards={"val": 0, "train": 0}, complete=False)

    def save():
        _replace(state_path, json.dumps(state, indent=1).encode())

    out.mkdir(parents=True, exist_ok=True)
    save()
    h = tg.Hyperparameters(data_dir=str(out), vocab_size=vocab_size)  # for train_gpt.py's file names
    model_path = tg.tokenizer_path(h)
    if not model_path.exists():
        model_path.parent.mkdir(exist_ok=True)
        print(f"training the tokenizer on up to {tokenizer_docs:,} training documents", file=sys.stderr)
        training = itertools.islice(read_documents(docs_path, skip=val_docs), tokenizer_docs)  # never validation documents
        _replace(model_path, train_tokenizer(training, vocab_size))
    dataset = tg.dataset_dir(h)
    dataset.mkdir(parents=True, exist_ok=True)

    def batches():  # aligned at 0 and at val_docs, so a resumed export cuts the same batches
        docs, i = read_documents(docs_path, skip=state["docs_done"]), state["docs_done"]
        while batch := list(itertools.islice(docs, batch_docs if i >= val_docs else min(batch_docs, val_docs - i))):
            yield batch, i < val_docs
            i += len(batch)

    pending = dict(ids=[], counts=[], docs=0, tokens=0, split=None)

    def write_pending():
        split, n = pending["split"], state["shards"][pending["split"]]
        _replace(dataset / f"fineweb_{split}_{n:06d}.bin", tg.shard_bytes(np.concatenate(pending["ids"])))
        if split == "val":
            _replace(dataset / f"fineweb_val_bytes_{n:06d}.bin", tg.shard_bytes(np.concatenate(pending["counts"])))
        state["shards"][split] += 1
        state["docs_done"] += pending["docs"]
        save()
        pending.update(ids=[], counts=[], docs=0, tokens=0)

    progress = Progress("export")
    with multiprocessing.Pool(workers or os.cpu_count(), initializer=_init_worker, initargs=(str(model_path),)) as pool:
        for ids, counts, num_docs, is_val in pool.imap(_encode_batch, batches()):
            split = "val" if is_val else "train"
            if pending["docs"] and (split != pending["split"] or pending["tokens"] + len(ids) > shard_tokens):
                write_pending()
            pending["split"] = split
            pending["ids"].append(ids)
            pending["counts"].append(counts)
            pending["docs"] += num_docs
            pending["tokens"] += len(ids)
            progress.add(num_docs, len(ids))
    if pending["docs"]:
        write_pending()
    progress.done()
    state["complete"] = True
    save()
    print(f"{out}: {state['docs_done']:,} documents, {state['shards']['val']} validation and {state['shards']['train']} training shards", file=sys.stderr)
    return state


def _replace(path: Path, data: bytes):
    """Writes a file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def docs_from_shards(data_dir: Path, out: Path, vocab_size: int = 8192):
    """Documents back from a plain sentencepiece dataset: every shard (validation first, so that
    its documents stay the first ones) split at BOS and decoded, one {"text": ...} line each."""
    h = tg.Hyperparameters(data_dir=str(data_dir), vocab_size=vocab_size)
    sp = tg.load_tokenizer(tg.tokenizer_path(h), vocab_size)
    files = tg.find_shards(h, "val") + tg.find_shards(h, "train")
    count = 0
    with open(out, "w", encoding="utf-8") as f:
        for path in files:
            tokens = np.asarray(tg.read_shard(path)).astype(np.int64)
            starts = np.flatnonzero(tokens == tg.BOS_ID)
            for a, b in zip(starts, [*starts[1:], len(tokens)]):
                f.write(json.dumps({"text": sp.decode(tokens[a + 1 : b].tolist())}, ensure_ascii=False) + "\n")
                count += 1
    print(f"{out}: {count:,} documents from {len(files)} shards", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="documents (.jsonl) -> CaseOps tokenizer, shards and byte sidecars")
    ex.add_argument("docs", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--vocab-size", type=int, default=8192)
    ex.add_argument("--val-docs", type=int, default=50_000, help="the first N documents are validation")
    ex.add_argument("--tokenizer-docs", type=int, default=200_000, help="training documents the tokenizer learns from")
    ex.add_argument("--shard-tokens", type=int, default=100_000_000)
    ex.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    back = sub.add_parser("docs-from-shards", help="a plain sentencepiece dataset -> documents (.jsonl)")
    back.add_argument("data_dir", type=Path)
    back.add_argument("out", type=Path)
    back.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    if args.command == "export":
        export(args.docs, args.out, args.vocab_size, args.val_docs, args.tokenizer_docs, args.shard_tokens, args.workers)
    else:
        docs_from_shards(args.data_dir, args.out, args.vocab_size)


if __name__ == "__main__":
    main()
