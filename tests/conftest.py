"""Shared fixtures: a tiny tokenizer trained here and a tiny corpus in the challenge's shard
format. Nothing depends on ../shared or on a GPU."""

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

TINY_VOCAB = 320


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
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_documents(400, seed=0)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def encode_documents(sp, docs) -> np.ndarray:
    ids = []
    for d in docs:
        ids += [tg.BOS_ID] + sp.encode(d)
    return np.array(ids, dtype=np.uint16)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """DATA_DIR layout: datasets/fineweb10B_sp320/{train,val} shards + tokenizers/fineweb_320_bpe.model."""
    root = tmp_path_factory.mktemp("data")
    (root / "tokenizers").mkdir()
    sp = train_tokenizer(root / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model")
    ds = root / "datasets" / f"fineweb10B_sp{TINY_VOCAB}"
    ds.mkdir(parents=True)
    for i in range(2):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", encode_documents(sp, synthetic_documents(600, seed=10 + i)))
    tg.write_shard(ds / "fineweb_val_000000.bin", encode_documents(sp, synthetic_documents(50, seed=99)))
    return root, sp


def tiny_hyperparameters(**overrides) -> "tg.Hyperparameters":
    """A model small enough to train and evaluate on one CPU core in seconds."""
    values = dict(
        vocab_size=TINY_VOCAB, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=4,
        parallel_from_layer=3, loop_start=1, loop_end=2, num_loops=1, train_seq_len=32, eval_seq_len=32,
        eval_stride=8, eval_batch_seqs=4, ttt_chunk_tokens=128, ttt_batch_seqs=4, train_batch_tokens=256,
        compile=False, warmup_steps=0, passthrough_max_numel=4096,
    )
    values.update(overrides)
    return tg.Hyperparameters(**values)


@pytest.fixture
def cpu_runtime():
    return tg.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def _clean_hyperparameter_env(monkeypatch):
    """Tests see no hyperparameter overrides from the calling shell."""
    import dataclasses

    for f in dataclasses.fields(tg.Hyperparameters):
        monkeypatch.delenv(f.name.upper(), raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
