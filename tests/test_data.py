"""Shard format, loader determinism and rank disjointness, validation tokens, byte accounting."""

import io

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY_VOCAB, encode_documents, synthetic_documents, tiny_hyperparameters


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, size=1000).astype(np.uint16)
    tg.write_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2 * 1000
    np.testing.assert_array_equal(np.asarray(tg.read_shard(tmp_path / "s.bin")), tokens)


def _corrupt(path, word, value):
    data = bytearray(path.read_bytes())
    data[4 * word : 4 * word + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: _corrupt(p, 0, 12345), "bad magic 12345"),
        (lambda p: _corrupt(p, 1, 2), "unsupported shard version 2"),
        (lambda p: _corrupt(p, 2, 11), "header says 11 tokens"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "header says 10 tokens .* file has 1042 bytes"),
        (lambda p: p.write_bytes(b"\0" * 100), "100 bytes, shorter than the 1024-byte shard header"),
    ],
)
def test_shard_rejections_name_the_file(tmp_path, mutate, message):
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, np.arange(10, dtype=np.uint16))
    mutate(path)
    with pytest.raises(ValueError, match=message) as err:
        tg.read_shard(path)
    assert str(path) in str(err.value)


def test_missing_data_dir_says_how_to_download(tmp_path):
    """The hint fits the vocabulary: the challenge's download for its sizes, the synthetic corpus
    for the quick run's."""
    h = tiny_hyperparameters(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"DATA_DIR='.*nowhere': directory not found; VOCAB_SIZE=320 is not one of the challenge's downloads \(sp1024, sp8192\); `python3 tests/tiny_data.py DIR`"):
        tg.check_data_dir(h)
    for vocab in (1024, 8192):
        with pytest.raises(FileNotFoundError, match=rf"download it: in a clone of https://github.com/openai/parameter-golf, `python3 data/cached_challenge_fineweb.py --variant sp{vocab}`"):
            tg.check_data_dir(tg.Hyperparameters(data_dir=str(tmp_path / "nowhere"), vocab_size=vocab))


def test_missing_directory_and_empty_glob(tmp_path):
    h = tiny_hyperparameters(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset directory .* not found .*DATA_DIR=.*VOCAB_SIZE=320"):
        tg.find_shards(h, "train")
    tg.dataset_dir(h).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no .*fineweb_train_\*\.bin shards found"):
        tg.find_shards(h, "train")


def test_tokenizer_missing_and_wrong_vocab(tiny_data, tmp_path):
    root, _ = tiny_data
    with pytest.raises(FileNotFoundError, match="tokenizer .* not found"):
        tg.load_tokenizer(tmp_path / "nope.model", TINY_VOCAB)
    with pytest.raises(ValueError, match=f"VOCAB_SIZE=8192 but tokenizer .* has {TINY_VOCAB} pieces"):
        tg.load_tokenizer(root / "tokenizers" / f"fineweb_{TINY_VOCAB}_bpe.model", 8192)


def test_corrupt_tokenizer_names_the_file_and_variable(tmp_path):
    path = tmp_path / "fineweb_320_bpe.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tokenizer .*fineweb_320_bpe.model \(DATA_DIR/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model\) is not a readable sentencepiece model"):
        tg.load_tokenizer(path, TINY_VOCAB)


def _loader(files, rank=0, world=1, seed=0, seq_len=16, batch=4, vocab=65536):
    return tg.TrainLoader(files, seq_len, batch, rank, world, seed, vocab, torch.device("cpu"))


def _shards(tmp_path, sizes):
    """Shards whose token values are their global positions, so every drawn sequence says
    exactly which tokens it came from."""
    assert sum(sizes) <= 65536
    files, offset = [], 0
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"fineweb_train_{i:06d}.bin")
        tg.write_shard(files[-1], np.arange(offset, offset + n).astype(np.uint16))
        offset += n
    return files


def test_loader_is_deterministic_by_seed_and_rank(tmp_path):
    files = _shards(tmp_path, [3000, 2000])
    la, lb, lc = _loader(files, seed=1), _loader(files, seed=1), _loader(files, seed=2)
    seq_a = [la.next_sequences() for _ in range(20)]
    seq_b = [lb.next_sequences() for _ in range(20)]
    seq_c = [lc.next_sequences() for _ in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(np.array_equal(x, y) for x, y in zip(seq_a, seq_c))
    assert seq_a[0].shape == (4, 17)
    x, y = _loader(files, seed=1).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long


def test_prefetching_changes_no_batch(tmp_path):
    """train_step prefetches the next step's first batch: the batches and their order stay those
    of a loader that never prefetches (a second prefetch before the batch is taken reads nothing)."""
    files = _shards(tmp_path, [3000, 2000])
    plain, prefetching = _loader(files, seed=3), _loader(files, seed=3)
    for i in range(12):
        if i % 3 == 0:
            prefetching.prefetch()
            prefetching.prefetch()
        for a, b in zip(plain.next_batch(), prefetching.next_batch()):
            assert torch.equal(a, b)


def test_sequences_are_contiguous_cover_an_epoch_without_repeats(tmp_path):
    files = _shards(tmp_path, [1000])
    loader = _loader(files, seq_len=16, batch=1)
    starts = []
    for _ in range(1000 // 16 - 1):
        s = loader.next_sequences()[0]
        assert np.array_equal(s, np.arange(s[0], s[0] + 17))  # a contiguous run of the shard
        starts.append(int(s[0]))
    assert len(set(starts)) == len(starts)  # no sequence twice within an epoch
    assert len({s % 16 for s in starts}) == 1  # one random phase per epoch


@pytest.mark.parametrize("sizes, world", [([1000, 1200, 900, 1100], 2), ([4000, 3000], 4), ([5000], 2)])
def test_ranks_read_disjoint_tokens(tmp_path, sizes, world):
    files = _shards(tmp_path, sizes)
    drawn = []
    for rank in range(world):
        loader = _loader(files, rank=rank, world=world, batch=8)
        tokens = set()
        for _ in range(2 * sum(sizes) // (8 * 16 * world)):  # about two epochs
            tokens |= set(loader.next_sequences().ravel().tolist())
        drawn.append(tokens)
    for a in range(world):
        for b in range(a + 1, world):
            # a sequence's last token is the next one's first, so spans may touch at one token
            assert len(drawn[a] & drawn[b]) == 0
    # together the ranks read nearly all the data (each span loses < one sequence per phase)
    assert sum(len(t) for t in drawn) > 0.9 * sum(sizes)


def test_rank_loader_stays_inside_its_span(tmp_path):
    files = _shards(tmp_path, [6000])  # one shard, two ranks: halves [0,3000) and [3000,6000)
    for rank, (lo, hi) in enumerate([(0, 3000), (3000, 6000)]):
        loader = _loader(files, rank=rank, world=2, batch=8)
        for _ in range(50):
            seqs = loader.next_sequences()
            assert seqs.min() >= lo and seqs.max() < hi


def test_out_of_vocab_training_tokens_name_their_shard(tmp_path):
    files = _shards(tmp_path, [50, 2000])  # ids 0..49 in shard 0 are in range, shard 1's are not
    with pytest.raises(ValueError, match=r"fineweb_train_000001.bin: training token id \d+ >= VOCAB_SIZE=100"):
        _loader(files, vocab=100, batch=2).next_sequences()


def test_shards_too_small_for_a_sequence(tmp_path):
    files = _shards(tmp_path, [10])
    with pytest.raises(ValueError, match="no sequence of TRAIN_SEQ_LEN"):
        _loader(files).next_sequences()


def test_validation_tokens_truncated_to_whole_windows(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50, dtype=np.uint16))
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(50, 80, dtype=np.uint16))
    files = sorted(tmp_path.glob("fineweb_val_*.bin"))
    tokens = tg.load_validation_tokens(files, seq_len=16, vocab_size=100)
    assert len(tokens) == 65 and tokens.tolist() == list(range(65))  # (80-1)//16*16 + 1
    with pytest.raises(ValueError, match="fewer than EVAL_SEQ_LEN"):
        tg.load_validation_tokens(files, seq_len=100, vocab_size=100)
    with pytest.raises(ValueError, match="fineweb_val_000001.bin: validation token id 79 >= VOCAB_SIZE=70"):
        tg.load_validation_tokens(files, seq_len=16, vocab_size=70)


def test_the_run_records_which_data_it_used(tmp_path):
    """submission.json's data: the documents in the shards (a short last one cut off by the
    windows still counts: the set is the shards'), the scored targets and bytes, a fingerprint that
    follows the scored tokens, and the training shards and tokens."""
    bos = tg.BOS_ID
    val = np.array([bos, 5, 6, 7, bos, 8, 9, 10, 11, 12, bos, 13, 14, bos, 15], dtype=np.uint16)  # 4 documents
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", val[:9])
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", val[9:])
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(2, 40, dtype=np.uint16))
    val_files, train_files = sorted(tmp_path.glob("fineweb_val_*.bin")), sorted(tmp_path.glob("fineweb_train_*.bin"))
    tokens = tg.load_validation_tokens(val_files, seq_len=4, vocab_size=100)  # 13 tokens: the last BOS and 15 cut off
    nbytes = torch.ones(len(tokens) - 1)
    data = tg.describe_data(val_files, tokens, nbytes, None, train_files)
    assert data == dict(validation_documents=4, validation_targets=12, validation_bytes=12, byte_sidecar=False,
                        validation_sha256=data["validation_sha256"], train_shards=1, train_tokens=38)
    other = tokens.clone()
    other[3] = 99
    assert tg.describe_data(val_files, other, nbytes, None, train_files)["validation_sha256"] != data["validation_sha256"]
    assert tg.describe_data(val_files, tokens.clone(), nbytes, None, [])["validation_sha256"] == data["validation_sha256"]


# --- byte accounting ----------------------------------------------------------------------


def test_byte_accounting_hand_computed(tiny_data):
    _, sp = tiny_data
    tables = tg.build_byte_tables(sp)
    pid = sp.piece_to_id
    # Pick pieces whose bytes we can count by hand.
    word = next(p for p in (sp.id_to_piece(i) for i in range(sp.vocab_size())) if p.startswith("\u2581") and len(p) >= 3 and p[1:].isascii())
    plain = next(p for p in (sp.id_to_piece(i) for i in range(sp.vocab_size())) if not p.startswith("\u2581") and not p.startswith("<") and p.isascii() and len(p) >= 2)
    sequence = [tg.BOS_ID, pid(word), pid(plain), pid(word), pid("<0xE6>"), tg.BOS_ID, pid(word)]
    prev, target = torch.tensor(sequence[:-1]), torch.tensor(sequence[1:])
    got = tables.target_bytes(prev, target).tolist()
    n_word = len(word) - 1  # ascii letters after the '▁'
    expected = [
        n_word,  # word after BOS: its leading space was not in the text
        len(plain),  # no leading space
        n_word + 1,  # word after a normal token: its space counts
        1,  # byte-fallback token: one byte
        0,  # BOS: control token, no bytes
        n_word,  # word after BOS again
    ]
    assert got == expected
    assert tables.is_boundary[[0, 1, 2, 3]].all() and not tables.is_boundary[pid(word)]
    assert tables.base_bytes[pid("<0xE6>")] == 1 and tables.base_bytes[tg.BOS_ID] == 0


def test_byte_total_equals_utf8_length_of_decoded_documents(tiny_data):
    _, sp = tiny_data
    tables = tg.build_byte_tables(sp)
    docs = synthetic_documents(30, seed=5) + ["naïve €uro — 東京 ✓ 𝔘nicode", "x" * 40]
    tokens = torch.from_numpy(encode_documents(sp, docs).astype(np.int64))
    counted = int(tables.target_bytes(tokens[:-1], tokens[1:]).sum())
    independent = sum(len(sp.decode(sp.encode(d)).encode("utf-8")) for d in docs)
    assert counted == independent


# --- byte sidecars (CaseOps exports) --------------------------------------------------------


def _val_dir_with_sidecars(tmp_path, tokens, counts):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    if counts is not None:
        tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", counts)
    return [tmp_path / "fineweb_val_000000.bin"]


def test_byte_sidecar_gives_the_bytes_of_every_target(tmp_path):
    tokens = np.arange(20, dtype=np.uint16)
    counts = (np.arange(20) % 4).astype(np.uint16)  # e.g. 0 for an operator or BOS
    files = _val_dir_with_sidecars(tmp_path, tokens, counts)
    val = tg.load_validation_tokens(files, seq_len=8, vocab_size=100)  # 17 tokens: 16 targets
    sidecar = tg.load_validation_byte_sidecars(files, len(val))
    target_bytes = tg.validation_target_bytes(val, None, sidecar)
    assert target_bytes.tolist() == (np.arange(1, 17) % 4).tolist()  # target k covers token k+1


def test_val_shards_glob_leaves_the_sidecars_out(tmp_path):
    ds = tmp_path / "datasets" / "fineweb10B_sp320"
    ds.mkdir(parents=True)
    _val_dir_with_sidecars(ds, np.arange(20, dtype=np.uint16), np.ones(20, dtype=np.uint16))
    assert [f.name for f in tg.find_shards(tiny_hyperparameters(data_dir=str(tmp_path)), "val")] == ["fineweb_val_000000.bin"]


def test_no_sidecar_means_the_tokenizer_counts(tiny_data):
    root, sp = tiny_data
    h = tiny_hyperparameters(data_dir=str(root))
    files = tg.find_shards(h, "val")
    val = tg.load_validation_tokens(files, 32, h.vocab_size)
    assert tg.load_validation_byte_sidecars(files, len(val)) is None
    tables = tg.build_byte_tables(sp)
    assert torch.equal(tg.validation_target_bytes(val, tables), tables.target_bytes(val[:-1], val[1:]))


def test_sidecar_of_the_wrong_length_or_missing_is_a_clear_error(tmp_path):
    files = _val_dir_with_sidecars(tmp_path, np.arange(20, dtype=np.uint16), np.ones(19, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000000.bin: 19 byte counts for the 20 tokens of .*fineweb_val_000000.bin"):
        tg.load_validation_byte_sidecars(files, 17)
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(20, dtype=np.uint16))
    with pytest.raises(FileNotFoundError, match="fineweb_val_bytes_000001.bin missing"):
        tg.load_validation_byte_sidecars(files + [tmp_path / "fineweb_val_000001.bin"], 17)
