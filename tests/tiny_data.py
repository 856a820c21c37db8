"""A tiny corpus in the challenge's layout, for the tests and for a one-minute CPU run.

    python3 tests/tiny_data.py /tmp/tiny && env $(cat /tmp/tiny/quick_run.env) python3 train_gpt.py

writes DATA_DIR=/tmp/tiny (a 320-piece sentencepiece tokenizer trained here, two train shards
and one validation shard of synthetic English-like documents) and quick_run.env, the settings
of a model small enough to train, quantize and evaluate on a CPU in about a minute.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caseops  # noqa: E402
import train_gpt as tg  # noqa: E402

TINY_VOCAB = 320

# A model and schedule that run end to end on one CPU core in seconds (the smoke test's settings).
QUICK_RUN_ENV = dict(
    VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2",
    ROPE_DIMS="4", PARALLEL_FROM_LAYER="3", LANES_FROM_LAYER="3", LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", TRAIN_SEQ_LEN="32",
    EVAL_SEQ_LEN="32", EVAL_STRIDE="16", EVAL_BATCH_SEQS="16", TTT_CHUNK_TOKENS="512", TTT_BATCH_SEQS="16",
    TRAIN_BATCH_TOKENS="512", COMPILE="0", WARMUP_STEPS="2", ITERATIONS="12", MAX_WALLCLOCK_SECONDS="300",
    GPTQ_RESERVE_SECONDS="5", PASSTHROUGH_MAX_NUMEL="4096", GPTQ_CALIB_SEQS="8", LOG_EVERY="4",
    COMPRESS_LEVEL="6", QUANT_ALLOC_SEQS="16", TTT_EPOCHS="1", LORA_TTT_CHUNK_TOKENS="8", LORA_TTT_LONG_CHUNK_TOKENS="16", LORA_TTT_BATCH_DOCS="4",
)


def synthetic_documents(num_docs: int, seed: int) -> list[str]:
    """Short English-like documents with a little structure, digits and non-ASCII text."""
    rng = np.random.default_rng(seed)
    subjects = ["the model", "a kernel", "the shard", "our loader", "every rank", "the tokenizer", "this test"]
    verbs = ["reads", "writes", "scores", "compresses", "trains", "checks", "counts"]
    objects = ["tokens", "bytes", "weights", "windows", "chunks", "gradients", "café menus", "東京 data"]
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.integers(2, 6)):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.integers(0, 1000)} {rng.choice(objects)}"
            sentences.append(s[0].upper() + s[1:] + ".")
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(path: Path, vocab_size: int = TINY_VOCAB):
    """A BPE tokenizer with the challenge's settings (caseops.TOKENIZER_SETTINGS; full character
    coverage), trained on synthetic documents."""
    import sentencepiece as spm

    path.write_bytes(caseops.train_tokenizer(synthetic_documents(400, seed=0), vocab_size, caseops=False, character_coverage=1.0))
    return spm.SentencePieceProcessor(model_file=str(path))


def encode_documents(sp, docs) -> np.ndarray:
    """[BOS] + ids of every document, concatenated (the shards' convention)."""
    ids = []
    for d in docs:
        ids += [tg.BOS_ID] + sp.encode(d)
    return np.array(ids, dtype=np.uint16)


def write_tiny_dataset(root: Path):
    """DATA_DIR layout under root: datasets/fineweb10B_sp320/{train,val} shards and
    tokenizers/fineweb_320_bpe.model. Returns the tokenizer."""
    (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(root / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model")
    ds = root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    ds.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", encode_documents(sp, synthetic_documents(600, seed=10 + i)))
    tg.write_shard(ds / "fineweb_val_000000.bin", encode_documents(sp, synthetic_documents(50, seed=99)))
    return sp


def main(argv: list[str]) -> int:
    usage = "usage: python3 tests/tiny_data.py OUTPUT_DIR"
    if argv in (["-h"], ["--help"]):
        print(f"{usage}\n{__doc__}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"{usage} (got {' '.join(argv) or 'no arguments'}; --help for more)", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    write_tiny_dataset(out)
    env = {"DATA_DIR": str(out), **QUICK_RUN_ENV}
    (out / "quick_run.env").write_text(" ".join(f"{k}={v}" for k, v in env.items()) + "\n")
    print(f"wrote {out} and {out / 'quick_run.env'}; run:  env $(cat {out / 'quick_run.env'}) python3 train_gpt.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
