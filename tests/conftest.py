"""Shared fixtures: a tiny tokenizer trained here and a tiny corpus in the challenge's shard
format (tiny_data.py). Nothing depends on ../shared or on a GPU."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402

# The tests' models are tiny: one thread runs them as fast as two, and leaves the second core to
# the subprocesses some tests start (the background compile check, 2-rank groups, script runs).
torch.set_num_threads(1)
from tiny_data import TINY_VOCAB, encode_documents, synthetic_documents, write_tiny_dataset  # noqa: E402,F401


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(items):
    """A selected test with a `start_early` attribute starts its slow subprocess now, so that it
    runs beside the rest of the suite (test_training.py's compile check)."""
    for item in items:
        getattr(getattr(item, "function", None), "start_early", lambda: None)()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """DATA_DIR layout: datasets/fineweb10B_sp320/{train,val} shards + tokenizers/fineweb_320_bpe.model."""
    root = tmp_path_factory.mktemp("data")
    return root, write_tiny_dataset(root)


def tiny_hyperparameters(**overrides) -> "tg.Hyperparameters":
    """A model small enough to train and evaluate on one CPU core in seconds."""
    values = dict(
        vocab_size=TINY_VOCAB, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=4,
        parallel_from_layer=3, lanes_from_layer=3, loop_start=1, loop_end=2, num_loops=1, train_seq_len=32, eval_seq_len=32,
        eval_stride=8, eval_batch_seqs=4, ttt_chunk_tokens=128, ttt_batch_seqs=4, train_batch_tokens=256,
        compile=False, warmup_steps=0, passthrough_max_numel=4096,
        lora_ttt_chunk_tokens=8, lora_ttt_long_chunk_tokens=16, lora_ttt_batch_docs=4,
    )
    values.update(overrides)
    return tg.Hyperparameters(**values)


class Recorder:
    """An evaluation's observer (train_gpt.py's _Accumulator): every event but the windows in
    order (trace), and each target's score as it was counted (token_nll, NaN where none was)."""

    def __init__(self, num_targets: int):
        self.trace, self.token_nll = [], torch.full((num_targets,), float("nan"), dtype=torch.float64)

    def __call__(self, event, *where, scores=None):
        if scores is not None:
            self.token_nll[where[-2] : where[-1]] = scores.detach().double().cpu()
        if event != "window":
            self.trace.append((event, *where))


def observed(evaluation, tokens, *args, return_token_nll=False, trace=None, **kw):
    """evaluation(..., observe=...) with a Recorder: the result gets the per-target scores as
    .token_nll if asked for, and trace (a list) is extended with the events."""
    recorder = Recorder(len(tokens) - 1)
    result = evaluation(*args, observe=recorder, **kw)
    if trace is not None:
        trace.extend(recorder.trace)
    if return_token_nll:
        result.token_nll = recorder.token_nll
    return result


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
