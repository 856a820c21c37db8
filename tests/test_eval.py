"""Evaluation rules: every target scored exactly once from its prefix only; TTT trains only on
tokens already scored; the byte total is the text's; ranks agree."""

import math

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import observed, tiny_hyperparameters
from distributed import run_distributed

SEQ, STRIDE, CHUNK = 32, 8, 128
MODES = {
    "plain": dict(stride=None, ttt=None),
    "sliding": dict(stride=STRIDE, ttt=None),
    "ttt": dict(stride=STRIDE, ttt=tg.TTTConfig(seq_len=SEQ, chunk_tokens=CHUNK, lr=0.05, momentum=0.9, epochs=2, batch_seqs=2, grad_clip=1.0)),
}


def _model(seed=0):
    torch.manual_seed(seed)
    h = tiny_hyperparameters(eval_seq_len=SEQ)
    model = tg.GPT(h.model_config())
    for p in model.parameters():
        p.data.normal_(0, 0.15)
    model = model.using(looping=True)
    return model


def _stream(tiny_data, windows=20):
    _, sp = tiny_data
    root, _ = tiny_data
    h = tiny_hyperparameters(data_dir=str(root))
    tokens = tg.load_validation_tokens(tg.find_shards(h, "val"), SEQ, h.vocab_size)
    return tokens[: SEQ * windows + 1], tg.build_byte_tables(sp)


def _scrambled(tokens, start, end):
    """A copy with tokens [start, end) changed, none of them into a BOS (a BOS stays one)."""
    changed, part = tokens.clone(), tokens[start:end]
    changed[start:end] = torch.where(part == tg.BOS_ID, part, (part * 7 + 3) % 300 + 2)
    return changed


def assert_causal_in_order(score, tokens, units):
    """The rule every evaluation is held to, each in its own stated order: `units` are target
    ranges [first, end) in the order the evaluation scores them, `score(tokens)` the per-target
    scores. Changing a unit's tokens (its BOS and its length kept) moves no score of a unit
    before it, and changing a unit's second half moves none of its first half either."""
    base = score(tokens)
    for i, (first, end) in enumerate(units):
        middle = first + (end - first) // 2
        for start in (first + 1, middle + 1):  # target k is token k + 1: targets from start - 1 on may move
            if start >= end:
                continue
            nll = score(_scrambled(tokens, start, end))
            for f, e in [*units[:i], (first, start - 1)]:
                assert torch.equal(nll[f:e], base[f:e]), f"changing tokens [{start}, {end}) moved a score of targets [{f}, {e}), earlier in the order"
            assert not torch.equal(nll[first:end], base[first:end])  # the change reached the scores


def _evaluate(model, tokens, tables, mode, rt, **kw):
    return observed(tg.evaluate, tokens, model, tokens, tg.validation_target_bytes(tokens, tables), tg.Windows(SEQ, MODES[mode]["stride"], 4), rt, MODES[mode]["ttt"], **kw)


def test_window_plans_cover_every_target_once():
    for stride in (None, 8, 32):
        covered = np.zeros(320, int)
        for start, scored in tg.window_plan(320, 32, stride):
            first = start + 32 - scored
            assert first >= start  # scored targets lie inside the window
            covered[first : first + scored] += 1
        assert (covered == 1).all()


@pytest.mark.parametrize("mode", list(MODES))
def test_every_target_scored_once_and_bytes_match(tiny_data, cpu_runtime, mode):
    tokens, tables = _stream(tiny_data)
    r = _evaluate(_model(), tokens, tables, mode, cpu_runtime, return_token_nll=True)
    assert r.tokens == len(tokens) - 1
    assert not torch.isnan(r.token_nll).any()
    assert math.isclose(r.nll_sum, r.token_nll.sum().item(), rel_tol=1e-9)
    assert r.byte_sum == tables.target_bytes(tokens[:-1], tokens[1:]).sum().item()
    assert r.bpb == pytest.approx(r.nll_sum / math.log(2) / r.byte_sum)


@pytest.mark.parametrize("mode", list(MODES))
def test_changing_future_tokens_changes_no_earlier_score(tiny_data, cpu_runtime, mode):
    tokens, tables = _stream(tiny_data)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _evaluate(model, tokens, tables, mode, cpu_runtime, return_token_nll=True).token_nll
    # Tokens after position t change; targets at positions <= t must not. With TTT also right after
    # each chunk boundary (t = c CHUNK + 1): a TTT step that read even one token past its scored
    # chunk would carry the change into target c CHUNK, the first of the next chunk.
    after_boundaries = tuple(c * CHUNK + 1 for c in range(1, (len(tokens) - 2) // CHUNK + 1))
    for t in (40,) + after_boundaries if mode == "ttt" else (40, 200, 457):
        model.load_state_dict(state)  # TTT modified the weights
        changed = tokens.clone()
        changed[t + 1 :] = (changed[t + 1 :] * 7 + 3) % 320
        nll = _evaluate(model, changed, tables, mode, cpu_runtime, return_token_nll=True).token_nll
        assert torch.equal(nll[:t], base[:t]), f"a score at position <= {t} moved"  # target k is position k+1
        assert not torch.equal(nll[t:], base[t:])
        model.load_state_dict(state)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_score_depends_only_on_documents_earlier_in_the_stream(tiny_data, cpu_runtime, mode):
    """The plain (quantized) score, the sliding diagnostic and score-first TTT are causal in
    stream order: checked document by document with the helper LoRA TTT uses for its queue."""
    tokens, tables = _stream(tiny_data, windows=28)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def score(t):
        model.load_state_dict(state)  # TTT trains the weights
        return _evaluate(model, t, tables, mode, cpu_runtime, return_token_nll=True).token_nll

    assert_causal_in_order(score, tokens, tg.document_spans(tokens))


def test_ttt_trains_only_on_already_scored_tokens(tiny_data, cpu_runtime):
    tokens, tables = _stream(tiny_data)
    trace = []
    _evaluate(_model(), tokens, tables, "ttt", cpu_runtime, trace=trace)
    scored_until = 0
    trained = 0
    for event, lo, hi in trace:
        if event == "score":
            assert lo == scored_until  # chunks scored in order, none skipped or repeated
            scored_until = hi
        else:
            assert hi <= scored_until, f"trained on targets up to {hi} with only {scored_until} scored"
            trained += 1
    assert scored_until == len(tokens) - 1
    num_chunks = math.ceil((len(tokens) - 1) / CHUNK)
    assert trained == (num_chunks - 1) * 2 * (CHUNK // SEQ // 2)  # epochs x batches, never after the last chunk


def test_ttt_changes_later_chunks_only(tiny_data, cpu_runtime):
    tokens, tables = _stream(tiny_data)
    sliding = _evaluate(_model(), tokens, tables, "sliding", cpu_runtime, return_token_nll=True).token_nll
    ttt = _evaluate(_model(), tokens, tables, "ttt", cpu_runtime, return_token_nll=True).token_nll
    assert torch.equal(ttt[:CHUNK], sliding[:CHUNK])  # first chunk: scored before any training
    assert not torch.allclose(ttt[CHUNK:], sliding[CHUNK:])


def test_ttt_with_zero_epochs_equals_sliding_exactly(tiny_data, cpu_runtime):
    tokens, tables = _stream(tiny_data)
    sliding = _evaluate(_model(), tokens, tables, "sliding", cpu_runtime)
    cfg = tg.TTTConfig(seq_len=SEQ, chunk_tokens=CHUNK, lr=0.05, momentum=0.9, epochs=0, batch_seqs=2, grad_clip=1.0)
    ttt = tg.evaluate(_model(), tokens, tg.validation_target_bytes(tokens, tables), tg.Windows(SEQ, STRIDE, 4), cpu_runtime, cfg)
    assert (ttt.nll_sum, ttt.byte_sum, ttt.tokens) == (sliding.nll_sum, sliding.byte_sum, sliding.tokens)


def test_sliding_scores_with_more_context_than_plain(tiny_data, cpu_runtime):
    tokens, tables = _stream(tiny_data)
    plain = _evaluate(_model(), tokens, tables, "plain", cpu_runtime, return_token_nll=True).token_nll
    sliding = _evaluate(_model(), tokens, tables, "sliding", cpu_runtime, return_token_nll=True).token_nll
    assert torch.equal(plain[:SEQ], sliding[:SEQ])  # the first window is the same in both
    assert not torch.allclose(plain[SEQ:], sliding[SEQ:])


def _evaluate_on_rank(rank, world_size, mode, tokens, tables):
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    r = _evaluate(_model().double(), tokens, tables, mode, rt)
    return r.nll_sum, r.byte_sum, r.tokens


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_give_the_same_totals(tiny_data, cpu_runtime, mode):
    """In float64 (autocast leaves it alone) the split across ranks changes nothing but the
    order of summation; in bf16 the per-rank batch shapes add rounding noise (~1e-5)."""
    tokens, tables = _stream(tiny_data)
    single = _evaluate(_model().double(), tokens, tables, mode, cpu_runtime)
    for nll, nbytes, count in run_distributed(_evaluate_on_rank, 2, mode, tokens, tables):
        assert count == single.tokens and nbytes == single.byte_sum
        assert nll == pytest.approx(single.nll_sum, rel=1e-9)


@pytest.mark.parametrize("mode", ["plain", "sliding"])
def test_bpb_from_a_byte_sidecar_equals_bpb_from_the_tokenizer_counts(tiny_data, cpu_runtime, mode):
    """A sidecar holding each token's bytes (what a CaseOps export writes) gives the same total as
    the tokenizer's tables, window by window."""
    tokens, tables = _stream(tiny_data)
    per_token = torch.cat([torch.zeros(1, dtype=torch.long), tables.target_bytes(tokens[:-1], tokens[1:])])
    from_tables = _evaluate(_model(), tokens, tables, mode, cpu_runtime)
    from_sidecar = tg.evaluate(_model(), tokens, tg.validation_target_bytes(tokens, None, per_token), tg.Windows(SEQ, MODES[mode]["stride"], 4), cpu_runtime)
    assert from_sidecar.byte_sum == from_tables.byte_sum and from_sidecar.bpb == from_tables.bpb
    shifted = tg.evaluate(_model(), tokens, tg.validation_target_bytes(tokens, None, per_token.roll(1)), tg.Windows(SEQ, MODES[mode]["stride"], 4), cpu_runtime)
    assert shifted.byte_sum != from_tables.byte_sum  # the counts really come from the sidecar


def test_with_doc_mask_a_document_changes_no_score_of_another(tiny_data, cpu_runtime):
    """DOC_MASK: sliding windows run across documents, yet no score outside a document moves
    when its tokens change (with the mask off, later scores do)."""
    tokens, tables = _stream(tiny_data)
    first, end = tg.document_spans(tokens)[1]
    changed = _scrambled(tokens, first + 1, end)  # inside the document: no BOS there

    def scores(doc_mask, toks):
        torch.manual_seed(0)
        model = tg.GPT(tiny_hyperparameters(eval_seq_len=SEQ, doc_mask=doc_mask).model_config())
        for p in model.parameters():
            p.data.normal_(0, 0.15)
        model = model.using(looping=True)
        return _evaluate(model, toks, tables, "sliding", cpu_runtime, return_token_nll=True).token_nll

    masked, masked_changed = scores(True, tokens), scores(True, changed)
    assert torch.equal(masked[:first], masked_changed[:first]) and torch.equal(masked[end:], masked_changed[end:])
    assert not torch.equal(masked[first:end], masked_changed[first:end])
    plain, plain_changed = scores(False, tokens), scores(False, changed)
    assert not torch.equal(plain[end:], plain_changed[end:])


def test_window_warm_up_runs_every_shape_of_the_plain_and_sliding_passes(tiny_data, cpu_runtime, monkeypatch):
    """The warm-up (random tokens) runs the blocks and the head at every shape the plain and
    sliding evaluations then run, without gradients, and changes no weight."""
    h = tiny_hyperparameters(eval_seq_len=SEQ, eval_stride=STRIDE, eval_batch_seqs=4)
    tokens, tables = _stream(tiny_data)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    shapes = {"warm": set(), "eval": set()}
    phase = "warm"
    original_hidden, original_nll = model.hidden_states, model.token_nll
    model.hidden_states = lambda x, adapters=None: shapes[phase].add(("blocks", tuple(x.shape), torch.is_grad_enabled())) or original_hidden(x, adapters)
    model.token_nll = lambda hidden, y: shapes[phase].add(("head", tuple(hidden.shape))) or original_nll(hidden, y)
    tg.warm_up_windows(model, h, cpu_runtime.device)
    phase = "eval"
    for stride in (None, STRIDE):
        tg.evaluate(model, tokens, tg.validation_target_bytes(tokens, tables), tg.Windows(SEQ, stride, 4), cpu_runtime)
    assert shapes["warm"] == shapes["eval"] and len(shapes["eval"]) == 3  # blocks [4, SEQ]; head with SEQ and STRIDE targets
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
