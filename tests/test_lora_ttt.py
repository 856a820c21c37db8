"""Per-document LoRA TTT: every target scored once, from its own document's prefix only; each
AdamW step uses only targets already counted; documents never see each other; ranks agree."""

import copy
import dataclasses
import math
import re

import pytest
import torch

import train_gpt as tg
from conftest import Recorder, observed, tiny_hyperparameters
from distributed import run_distributed
from test_eval import SEQ, _model, _scrambled, _stream, assert_causal_in_order

CHUNK = 8


def _h(**overrides):
    values = dict(eval_seq_len=SEQ, lora_ttt=True, lora_ttt_rank=4, lora_ttt_alpha=8.0, lora_ttt_lr=0.05, lora_ttt_wd=0.0, lora_ttt_beta2=0.999, lora_ttt_chunk_tokens=CHUNK, lora_ttt_batch_docs=3,
                  lora_ttt_targets=",".join(tg.LORA_TTT_TARGETS), ngram_tilt_beta=0.0)  # every target, no tilt
    return tiny_hyperparameters(**{**values, **overrides})


def _documents(tiny_data):
    tokens, tables = _stream(tiny_data, windows=12)
    docs = tg.document_spans(tokens)
    assert len(docs) >= 4 and max(e - s for s, e in docs) > SEQ  # several batches, and a document longer than the context
    return tokens, tables, docs


def _lora(tokens, tables, rt, h=None, model=None, **kw):
    return observed(tg.evaluate_lora_ttt, tokens, model or _model(), tokens, tg.validation_target_bytes(tokens, tables), h or _h(), rt, **kw)


CPU = tg.Runtime(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def learned(tiny_data):
    """One learning run, shared: (tokens, tables, documents, result with per-target scores, trace)."""
    tokens, tables, docs = _documents(tiny_data)
    trace = []
    return tokens, tables, docs, _lora(tokens, tables, CPU, return_token_nll=True, trace=trace), trace


def test_document_spans_start_at_bos_and_cover_every_target_once(tiny_data):
    tokens, _, docs = _documents(tiny_data)
    assert docs[0][0] == 0 and docs[-1][1] == len(tokens) - 1
    assert all(a[1] == b[0] for a, b in zip(docs, docs[1:]))
    assert all(tokens[s] == tg.BOS_ID for s, _ in docs)


def test_every_target_scored_once_and_bytes_match(learned):
    tokens, tables, _, r, _ = learned
    assert r.tokens == len(tokens) - 1 and not torch.isnan(r.token_nll).any()
    assert math.isclose(r.nll_sum, r.token_nll.sum().item(), rel_tol=1e-9)
    assert r.byte_sum == tables.target_bytes(tokens[:-1], tokens[1:]).sum().item()


def test_without_learning_each_target_is_scored_from_its_own_document_prefix(tiny_data, cpu_runtime):
    """LR 0: the adapters stay the identity, and every score equals the model's prediction from
    its own document's tokens in the window that ends with the target's slot on the chunk grid
    (<= SEQ tokens; as a sliding window with stride CHUNK, also for a partial last chunk),
    computed one target at a time (float64, which autocast leaves alone, so that batching and
    padding show up only as rounding)."""
    tokens, tables, docs = _documents(tiny_data)
    model = _model().double()
    r = _lora(tokens, tables, cpu_runtime, h=_h(lora_ttt_lr=0.0), model=model, return_token_nll=True)
    expected = torch.empty(len(tokens) - 1, dtype=torch.float64)
    with torch.no_grad():
        for first, end in docs:
            for k in range(first, end):
                slot_end = first + ((k - first) // CHUNK + 1) * CHUNK  # past the document's end for a partial last chunk
                window = tokens[max(first, slot_end - SEQ) : k + 1][None]
                expected[k] = model.token_nll(model.hidden_states(window)[:, -1:], tokens[k + 1 : k + 2][None]).double().item()
    torch.testing.assert_close(r.token_nll, expected, rtol=1e-9, atol=1e-9)


def test_a_wider_lora_window_scores_from_that_much_prefix_with_extrapolated_rope(tiny_data, cpu_runtime):
    """LORA_TTT_SEQ_LEN past the training length (the accepted rows' 2560 for 2048): with learning
    off, every score is the model's prediction from the last 48 tokens of its document up to the
    end of its grid slot, and RoPE's angles there simply continue past TRAIN_SEQ_LEN (no NTK
    rescale), while the sliding and plain windows keep EVAL_SEQ_LEN."""
    tokens, tables, docs = _documents(tiny_data)
    wide = 48
    h = _h(lora_ttt_lr=0.0, lora_ttt_seq_len=wide)
    h.validate(1)
    torch.manual_seed(0)
    model = tg.GPT(h.model_config()).double()
    for p in model.parameters():
        p.data.normal_(0, 0.15)
    model = model.using(looping=True)
    rotary = model.blocks[0].attn.rotary
    assert rotary.tables.size(1) == wide and torch.equal(rotary.tables.float(), tg.rotary_tables(h.rope_dims, h.rope_base, wide, wide))
    assert not torch.allclose(rotary.tables.float(), tg.rotary_tables(h.rope_dims, h.rope_base, wide, h.train_seq_len))  # not the NTK-rescaled ones
    r = observed(tg.evaluate_lora_ttt, tokens, model, tokens, tg.validation_target_bytes(tokens, tables), h, cpu_runtime, return_token_nll=True)
    assert max(e - f for f, e in docs) > wide
    expected = torch.empty(len(tokens) - 1, dtype=torch.float64)
    with torch.no_grad():
        for first, end in docs:
            for k in range(first, end):
                slot_end = first + ((k - first) // CHUNK + 1) * CHUNK
                window = tokens[max(first, slot_end - wide) : k + 1][None]
                expected[k] = model.token_nll(model.hidden_states(window)[:, -1:], tokens[k + 1 : k + 2][None]).double().item()
    torch.testing.assert_close(r.token_nll, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="LORA_TTT_SEQ_LEN=4096: must be <= 3072"):
        _h(lora_ttt_seq_len=4096).validate(1)


def test_with_doc_mask_lora_rows_take_the_plain_causal_kernel(learned, cpu_runtime, monkeypatch):
    """A LoRA TTT window holds one document (its BOS at most at the start), so DOC_MASK has
    nothing to mask there: no mask is built and every score is the unmasked model's."""
    tokens, tables, _, r, _ = learned
    model = _model()
    model.cfg = dataclasses.replace(model.cfg, doc_mask=True)
    monkeypatch.setattr(tg, "document_attention_mask", lambda ids, kind: pytest.fail("a document mask for LoRA TTT rows"))
    masked = _lora(tokens, tables, cpu_runtime, model=model, return_token_nll=True)
    assert torch.equal(masked.token_nll, r.token_nll)


def test_steps_use_only_scored_chunks_of_their_own_document_and_none_after_the_last(learned):
    _, _, docs, r, trace = learned
    scored = {first: first for first, _ in docs}  # per document: targets scored so far end here
    trained = []
    for event, doc, a, b in trace:
        if event == "score":
            assert a == scored[doc], "a document's chunks are scored in order, none skipped"
            scored[doc] = b
        else:
            assert b == scored[doc], "a step uses exactly the chunk just scored"
            trained.append((doc, a, b))
    assert all(scored[first] == end for first, end in docs)
    ends = dict(docs)
    assert all(b < ends[doc] for doc, _, b in trained)  # never a step after a document's last chunk
    assert len(trained) == sum(math.ceil((e - s) / CHUNK) - 1 for s, e in docs) and r.train_steps > 0


def test_learning_changes_only_later_chunks(learned, cpu_runtime):
    tokens, tables, docs, r, _ = learned
    frozen = _lora(tokens, tables, cpu_runtime, h=_h(lora_ttt_lr=0.0), return_token_nll=True).token_nll
    for first, end in docs:
        assert torch.equal(r.token_nll[first : first + CHUNK], frozen[first : first + CHUNK])  # scored before any step
    assert not torch.allclose(r.token_nll, frozen)


def test_changing_one_document_changes_no_other_document_nor_its_own_past(learned, cpu_runtime):
    tokens, tables, docs, r, _ = learned
    base = r.token_nll
    first, end = max(docs, key=lambda d: d[1] - d[0])  # the longest: several chunks, a step after each
    t = first + CHUNK + 3  # inside its second chunk
    changed = _scrambled(tokens, t + 1, end)
    assert not torch.equal(changed, tokens)
    nll = _lora(changed, tables, cpu_runtime, return_token_nll=True).token_nll
    assert torch.equal(nll[: t], base[: t]) and torch.equal(nll[end:], base[end:]), "a score outside the changed document's future moved"
    assert not torch.equal(nll[t:end], base[t:end])


def test_tokens_inserted_later_in_a_document_change_no_earlier_score(tiny_data, cpu_runtime):
    """Where a document ends is a future fact: tokens inserted after target t of a document
    longer than the context, in its last and partial chunk, leave every score up to t, and every
    other document's, as they were."""
    tokens, tables, docs = _documents(tiny_data)
    first, end = max(docs, key=lambda d: d[1] - d[0])
    assert end - first > SEQ
    filler = lambda n: torch.full((n,), 5, dtype=tokens.dtype)  # noqa: E731
    if (end - first) % CHUNK == 0:  # make its last chunk partial
        tokens, end = torch.cat([tokens[:end], filler(3), tokens[end:]]), end + 3
    t = first + (end - first) // CHUNK * CHUNK  # the last chunk's first target
    longer = torch.cat([tokens[: t + 1], filler(CHUNK // 2), tokens[t + 1 :]])
    base = _lora(tokens, tables, cpu_runtime, return_token_nll=True).token_nll
    nll = _lora(longer, tables, cpu_runtime, return_token_nll=True).token_nll
    assert torch.equal(nll[: t + 1], base[: t + 1]), "a score before the inserted tokens moved"
    assert torch.equal(nll[end + CHUNK // 2 :], base[end:]), "a later document's score moved"


PHASED = dict(lora_ttt_batch_docs=2, lora_ttt_phases=1, lora_ttt_phase_docs=2, lora_ttt_phase_lr=0.05, ttt_chunk_tokens=64, ttt_batch_seqs=2)  # one phase, after the first batch (2 documents)
TWO_PHASES = dict(PHASED, lora_ttt_batch_docs=1, lora_ttt_phases=2, lora_ttt_phase_docs=1)  # after the first and the second document


def _lora_on_rank(rank, world_size, tokens, tables, overrides):
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    r = _lora(tokens, tables, rt, h=_h(**overrides), model=_model().double())
    return r.nll_sum, r.byte_sum, r.tokens


@pytest.mark.parametrize("overrides", [{}, TWO_PHASES, dict(ngram_tilt_beta=2.0, ngram_tilt_order=2, ngram_tilt_min_share=0.6)], ids=["no phases", "phases", "stream tilt"])
def test_two_ranks_give_the_same_totals(tiny_data, cpu_runtime, overrides):
    """The ranks claim batches from a shared counter; whichever rank scores a document, its
    scores are the same, so only the order of summation differs. With phases, each rank stops
    at the boundary and the two train on halves of each batch with averaged gradients."""
    tokens, tables, _ = _documents(tiny_data)
    single = _lora(tokens, tables, cpu_runtime, h=_h(**overrides), model=_model().double())
    for nll, nbytes, count in run_distributed(_lora_on_rank, 2, tokens, tables, overrides):
        assert count == single.tokens and nbytes == single.byte_sum
        assert nll == pytest.approx(single.nll_sum, rel=1e-9)


def _lora_trace_on_rank(rank, world_size, tokens, tables):
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    trace = []
    _lora(tokens, tables, rt, h=_h(**TWO_PHASES), model=_model().double(), trace=trace)
    return trace


def test_across_ranks_every_phase_trains_only_on_documents_some_rank_finished_before_it(tiny_data):
    """Two ranks: each phase's documents were fully scored, between them, before that phase
    (the ranks enter a phase together: its steps all-reduce), and each document once."""
    tokens, tables, docs = _documents(tiny_data)
    ends = dict(docs)
    traces = run_distributed(_lora_trace_on_rank, 2, tokens, tables)
    finished = [[] for _ in traces]  # per rank and phase: the documents it had finished by then
    for rank, trace in enumerate(traces):
        scored = {}
        for event in trace:
            if event[0] == "score":
                scored[event[1]] = event[3]
            elif event[0] == "phase":
                assert all(end == ends[first] for first, end in scored.items()), "a rank entered a phase with a document half-scored"
                finished[rank].append({first for first in scored})
    phases = [[event[1] for event in trace if event[0] == "phase"] for trace in traces]
    assert phases[0] == phases[1] and [len(p) for p in phases[0]] == [1, 2]  # both ranks train on the same documents
    for p, documents in enumerate(phases[0]):
        assert {first for first, _ in documents} <= finished[0][p] | finished[1][p]
    scored_by = [{e[1] for e in trace if e[0] == "score"} for trace in traces]
    assert not scored_by[0] & scored_by[1] and scored_by[0] | scored_by[1] == set(ends)  # every document on one rank


def test_phases_leave_the_weights_as_they_found_them(tiny_data):
    """The phases train all weights on validation documents; the evaluations after LoRA TTT (the
    sliding diagnostic) must score the artifact's weights, not those."""
    tokens, tables, _ = _documents(tiny_data)
    model = _model()
    before = copy.deepcopy(model.state_dict())
    r = _lora(tokens, tables, CPU, h=_h(**TWO_PHASES), model=model)
    assert r.train_steps > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_phases_train_on_exactly_the_documents_scored_before_them(tiny_data):
    tokens, tables, docs = _documents(tiny_data)
    queue = sorted(docs, key=lambda d: d[0] - d[1])
    trace = []
    r = _lora(tokens, tables, CPU, h=_h(**TWO_PHASES), return_token_nll=True, trace=trace)
    ends, scored, phases = dict(docs), {first: first for first, _ in docs}, []
    for event in trace:
        if event[0] == "score":
            scored[event[1]] = event[3]
        elif event[0] == "phase":
            assert all(scored[first] == end for first, end in event[1]), "a phase trains on a document not fully scored"
            assert not any(first < scored[first] < ends[first] for first in scored), "a document is left half-scored across a phase"
            assert sorted(event[1]) == sorted(d for d in docs if scored[d[0]] == d[1]), "a phase leaves out a scored document"
            phases.append(event[1])
    assert phases == [queue[:1], queue[:2]] and not torch.isnan(r.token_nll).any()


def test_a_phase_changes_only_the_scores_after_it(tiny_data):
    """The first batch (two documents) is scored before the phase, the same as without phases;
    the later ones after the weights learned from it. A change late in a first-batch document
    moves no score of the first batch outside its own future, and moves later scores through the
    phase."""
    tokens, tables, docs = _documents(tiny_data)
    queue = sorted(docs, key=lambda d: d[0] - d[1])
    model = _model().double()
    plain = _lora(tokens, tables, CPU, model=copy.deepcopy(model), return_token_nll=True).token_nll
    phased = _lora(tokens, tables, CPU, h=_h(**PHASED), model=copy.deepcopy(model), return_token_nll=True).token_nll

    def scores(nll, batch_docs):
        return torch.cat([nll[first:end] for first, end in batch_docs])

    assert torch.equal(scores(phased, queue[:2]), scores(plain, queue[:2]))
    assert not torch.allclose(scores(phased, queue[2:]), scores(plain, queue[2:]))
    first, end = queue[1]
    t = first + (end - first) // 2
    changed = _scrambled(tokens, t + 1, end)
    moved = _lora(changed, tables, CPU, h=_h(**PHASED), model=copy.deepcopy(model), return_token_nll=True).token_nll
    assert torch.equal(scores(moved, [queue[0], (first, t)]), scores(phased, [queue[0], (first, t)]))
    assert not torch.allclose(scores(moved, queue[2:]), scores(phased, queue[2:]))


def test_phase_boundaries_are_whole_batches_inside_the_queue():
    h = _h(lora_ttt_phases=3, lora_ttt_phase_docs=833, lora_ttt_batch_docs=64)
    assert tg.phase_boundaries(782, h) == [13, 26, 39]  # 50k documents: phases after 832, 1664, 2496
    assert tg.phase_boundaries(30, h) == [13, 26] and tg.phase_boundaries(782, _h()) == []
    assert tg.phase_boundaries(10, _h(lora_ttt_phases=2, lora_ttt_phase_docs=1, lora_ttt_batch_docs=64)) == [1]


def test_batch_queue_hands_out_every_batch_once():
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    queue = tg.BatchQueue(3, rt)
    assert [queue.claim() for _ in range(5)] == [0, 1, 2, None, None]


def test_ngram_tilt_is_the_renormalised_tilted_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 17, generator=g, dtype=torch.float64)
    targets, hints = torch.randint(0, 17, (50,), generator=g), torch.randint(-1, 17, (50,), generator=g)
    logp = logits.log_softmax(-1)
    beta = 1.3
    tilted = logp + beta * (torch.arange(17) == hints[:, None])  # the hint's logit raised by beta; no hint (-1): unchanged
    expected = -tilted.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    hint_logp = logp.gather(1, hints.clamp_min(0)[:, None]).squeeze(1)
    torch.testing.assert_close(tg.ngram_tilt(nll, hint_logp, hints == targets, hints >= 0, beta), expected)
    assert (hints == -1).any() and (hints == targets).any()


def test_target_switches_adapt_only_what_they_name(learned, cpu_runtime):
    """LORA_TTT_TARGETS: the adapters exist for the named projections only (#2135's mask: K
    off); the scores change with the mask, and an adapter's initial A does not."""
    tokens, tables, _, r, _ = learned
    model = _model()
    every = tg.DocumentAdapters(model, 2, 4, 8.0)
    no_k = tg.DocumentAdapters(model, 2, 4, 8.0, ("q", "v", "o", "mlp", "head"))
    assert set(no_k.layer(0)) == {"q", "v", "o", "mlp"} and no_k.head() is not None
    assert torch.equal(no_k.A["v_3"], every.A["v_3"]) and "k_0" not in no_k.A
    no_head = tg.DocumentAdapters(model, 2, 4, 8.0, ("o", "mlp"))
    assert set(no_head.layer(0)) == {"o", "mlp"} and no_head.head() is None
    masked = _lora(tokens, tables, cpu_runtime, h=_h(lora_ttt_targets="q,v,o,mlp,head"), return_token_nll=True)
    assert masked.tokens == r.tokens and not torch.equal(masked.token_nll, r.token_nll)
    with pytest.raises(ValueError, match="LORA_TTT_TARGETS='q,x': a comma list of distinct q, k, v, o, mlp, head"):
        _h(lora_ttt_targets="q,x").validate(1)


def test_a_document_scores_the_same_in_any_row_beside_any_documents(tiny_data, cpu_runtime):
    """Every document starts from the same A and B = 0, so which row takes it, after which
    documents and beside which, changes none of its scores: one row (documents one after
    another) and three rows give the same per-target scores. In float64: in float32 the
    rounding of a [rows, ...] product differs with the number of rows, and the first AdamW
    steps (beta1 = 0) blow a rounding-sized gradient up to a full step."""
    tokens, tables, _ = _documents(tiny_data)
    model = _model().double()
    one = _lora(tokens, tables, cpu_runtime, h=_h(lora_ttt_batch_docs=1), model=copy.deepcopy(model), return_token_nll=True)
    three = _lora(tokens, tables, cpu_runtime, h=_h(lora_ttt_batch_docs=3), model=copy.deepcopy(model), return_token_nll=True)
    assert one.train_steps > 0 and torch.equal(one.token_nll, three.token_nll)


def _brute_force_pair_hints(inputs: list[int], targets: list[int], order: int, share: float) -> list[int]:
    """Per position k: among earlier j whose `order` inputs ending at j equal those ending at k,
    the most frequent targets[j], if its share reaches `share`; else -1."""
    hints = []
    for k in range(len(inputs)):
        context = inputs[k - order + 1 : k + 1] if k >= order - 1 else None
        follows = [targets[j] for j in range(order - 1, k) if context and inputs[j - order + 1 : j + 1] == context]
        best = max(set(follows), key=follows.count) if follows else -1
        hints.append(best if follows and follows.count(best) >= share * len(follows) else -1)
    return hints


def _brute_force_stream_hints(tokens: list[int], order: int, share: float) -> list[int]:
    return _brute_force_pair_hints(tokens[:-1], tokens[1:], order, share)


@pytest.mark.parametrize("alphabet, vocab", [([2, 3, 4], 8), ([2, 3, 8193], 8194)], ids=["small ids", "ids past 13 bits"])
def test_stream_hints_are_the_most_frequent_earlier_continuation_above_the_share(alphabet, vocab):
    """Against a brute-force search: every earlier occurrence of the context anywhere in the
    stream before the target, the most frequent continuation, fired at share >= the minimum."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        length = int(torch.randint(1, 160, (1,), generator=g))
        tokens = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (length,), generator=g)]
        order, share = 1 + trial % 6, (0.51, 0.8, 1.0)[trial % 3]
        assert tg.stream_ngram_hints(tokens[:-1], tokens[1:], order, share, vocab).tolist() == _brute_force_stream_hints(tokens.tolist(), order, share)
    long = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (3000,), generator=g)]
    fired = tg.stream_ngram_hints(long[:-1], long[1:], 3, 0.8, vocab)
    assert 0 < (fired >= 0).sum() < len(fired)


def test_a_stream_hint_never_reads_its_target_or_a_later_token():
    """Changing token t (target t - 1) leaves every hint of an earlier target as it was."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 6, (400,), generator=g)
    base = tg.stream_ngram_hints(tokens[:-1], tokens[1:], 4, 0.8, 8)
    for t in (1, 57, 200, 399):
        changed = tokens.clone()
        changed[t] = 2 + (changed[t] - 1) % 4
        hints = tg.stream_ngram_hints(changed[:-1], changed[1:], 4, 0.8, 8)
        assert torch.equal(hints[:t], base[:t])
        assert t == 399 or not torch.equal(hints, base)


def test_queue_hints_are_stream_hints_over_the_documents_in_queue_order():
    """Against the brute force over the (input, target) pairs laid out document after document
    in the given order: each target's hint, mapped back to its place in the stream."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, 5, (300,), generator=g)
    tokens[[0, 40, 45, 160, 230]] = tg.BOS_ID
    docs = tg.document_spans(tokens)
    queue = sorted(docs, key=lambda d: d[0] - d[1])
    assert queue != docs
    positions = [k for f, e in queue for k in range(f, e)]
    inputs, targets = tokens[positions].tolist(), tokens[[k + 1 for k in positions]].tolist()
    for order, share in ((1, 0.51), (2, 0.6), (3, 0.8), (4, 0.8), (5, 1.0)):
        hints = tg.queue_ngram_hints(tokens, queue, order, share, 8)
        assert hints[positions].tolist() == _brute_force_pair_hints(inputs, targets, order, share) and (hints >= 0).any()


DEFAULTS = dict(lora_ttt_batch_docs=2, lora_ttt_phases=1, lora_ttt_phase_docs=4, lora_ttt_phase_lr=0.05, ngram_tilt_beta=2.625, ngram_tilt_order=2, ngram_tilt_min_share=0.6)  # the defaults, scaled down: one phase after the first four documents, the stream tilt


def _varied_documents(tiny_data):
    """Ten documents of 31 to 120 targets whose queue order (longest first) differs from their
    stream order in several places."""
    tokens, tables = _stream(tiny_data, windows=28)
    docs = tg.document_spans(tokens)
    queue = sorted(docs, key=lambda d: d[0] - d[1])
    assert len(docs) >= 10 and sum(a != b for a, b in zip(docs, queue)) >= 6
    return tokens, tables, docs, queue


def test_with_the_defaults_every_score_depends_only_on_documents_earlier_in_the_queue(tiny_data):
    """The phase, the adapters and the stream hints all read documents in LoRA TTT's queue
    order: changing any document moves no score of a document before it in the queue, nor its
    own earlier scores (with hints in stream order this fails: a long document scored early
    reads a short one before it in the stream)."""
    tokens, tables, _, queue = _varied_documents(tiny_data)
    model = _model().double()

    def score(t):
        return _lora(t, tables, CPU, h=_h(**DEFAULTS), model=copy.deepcopy(model), return_token_nll=True).token_nll

    assert_causal_in_order(score, tokens, queue)


def _default_scores_on_rank(rank, world_size, tokens, tables):
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    r = _lora(tokens, tables, rt, h=_h(**DEFAULTS), model=_model().double(), return_token_nll=True)
    return r.token_nll, r.nll_sum, r.byte_sum, r.tokens


def test_with_the_defaults_one_two_and_four_ranks_give_the_same_scores(tiny_data):
    """Whichever rank claims which batch (two or four ranks racing for them), every target gets
    the score it gets on one rank (up to float64 rounding: the phase's gradients are summed
    across ranks), and the totals agree."""
    tokens, tables, _, _ = _varied_documents(tiny_data)
    single = _lora(tokens, tables, CPU, h=_h(**DEFAULTS), model=_model().double(), return_token_nll=True)
    assert single.train_steps > 0 and single.untilted_nll_sum != single.nll_sum
    for world_size in (2, 4):
        results = run_distributed(_default_scores_on_rank, world_size, tokens, tables)
        per_target = torch.full_like(single.token_nll, float("nan"))
        for token_nll, nll, nbytes, count in results:
            assert count == single.tokens and nbytes == single.byte_sum and nll == pytest.approx(single.nll_sum, rel=1e-12)
            mine = ~torch.isnan(token_nll)
            assert torch.isnan(per_target[mine]).all()  # each target scored by one rank
            per_target[mine] = token_nll[mine]
        torch.testing.assert_close(per_target, single.token_nll, rtol=1e-12, atol=1e-12)


def test_stream_tilt_reads_only_documents_earlier_in_the_queue(tiny_data):
    """With the phase and the tilt on: a document early in the stream but late in the queue,
    changed, leaves every document scored before it as it was (among them one after it in the
    stream), and moves the hints of documents after it in the queue; the tilt changes the
    scores, never the training, which learns from the untilted loss."""
    tokens, tables, docs, queue = _varied_documents(tiny_data)
    model = _model().double()
    run = lambda t, **o: _lora(t, tables, CPU, h=_h(**{**DEFAULTS, **o}), model=copy.deepcopy(model), return_token_nll=True)  # noqa: E731
    tilted, untilted = run(tokens), run(tokens, ngram_tilt_beta=0.0)
    assert tilted.untilted_nll_sum == pytest.approx(untilted.nll_sum, rel=1e-12) and tilted.nll_sum != pytest.approx(untilted.nll_sum, rel=1e-6)
    s = next(d for d in docs[:4] if queue.index(d) > 6 and any(docs.index(e) > docs.index(d) for e in queue[: queue.index(d)]))
    earlier = queue[: queue.index(s)]
    changed = run(_scrambled(tokens, s[0] + 1, s[1])).token_nll
    for f, e in earlier:
        assert torch.equal(changed[f:e], tilted.token_nll[f:e]), "a document scored earlier read the changed one"
    later = [d for d in queue[queue.index(s) + 1 :] if not torch.equal(changed[d[0] : d[1]], tilted.token_nll[d[0] : d[1]])]
    assert later  # the documents scored after it read it


def test_warm_up_runs_the_evaluations_one_shape_and_changes_nothing(tiny_data, cpu_runtime, monkeypatch):
    """Every chunk of every document runs rows x EVAL_SEQ_LEN (one compiled graph), the warm-up
    on random documents runs it forward and backward, and it leaves the weights as they were."""
    h = _h()
    tokens, tables = _stream(tiny_data, windows=12)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    shapes = {"warm": [], "eval": []}
    phase = "warm"
    original = model.hidden_states
    model.hidden_states = lambda x, adapters=None: shapes[phase].append((tuple(x.shape), torch.is_grad_enabled(), any(p.requires_grad for p in model.parameters()))) or original(x, adapters)
    steps = {"warm": 0, "eval": 0}
    step = tg.RowAdamW.step
    monkeypatch.setattr(tg.RowAdamW, "step", lambda self: steps.__setitem__(phase, steps[phase] + 1) or step(self))
    tg.warm_up_lora_ttt(model, h, cpu_runtime.device)
    phase = "eval"
    tg.evaluate_lora_ttt(model, tokens, tg.validation_target_bytes(tokens, tables), h, cpu_runtime)
    # the same shape, with gradients, the weights frozen (as the compiled graph's guards see them), and a backward in both
    assert set(shapes["warm"]) == set(shapes["eval"]) == {((h.lora_ttt_batch_docs, h.eval_seq_len), True, False)} and len(shapes["eval"]) > 10
    assert steps["warm"] > 0 and steps["eval"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and all(p.requires_grad for p in model.parameters())


def test_row_adamw_is_adamw_with_beta1_zero_restarted_per_row():
    """Each row follows torch's AdamW (betas (0, b2)) from the step its document started."""
    g = torch.Generator().manual_seed(0)
    rows, lr, b2, eps, wd = 3, 0.01, 0.9, 1e-8, 0.5
    param = torch.nn.Parameter(torch.randn(rows, 4, 5, generator=g, dtype=torch.float64))
    opt = tg.RowAdamW([param], rows, lr, b2, eps, wd)
    starts = {0: 0, 1: 2, 2: 4}  # the step each row's document starts at
    refs = {}
    for step in range(7):
        restart = torch.tensor([starts[r] == step for r in range(rows)])
        if restart.any():
            opt.restart(restart)
            for r in torch.nonzero(restart).flatten().tolist():
                refs[r] = torch.nn.Parameter(param.detach()[r].clone())
                refs[r].opt = torch.optim.AdamW([refs[r]], lr=lr, betas=(0.0, b2), eps=eps, weight_decay=wd)
        grad = torch.randn(rows, 4, 5, generator=g, dtype=torch.float64)
        param.grad = grad.clone()
        opt.step()
        for r, ref in refs.items():
            ref.grad = grad[r].clone()
            ref.opt.step()
            torch.testing.assert_close(param.detach()[r], ref.detach(), rtol=1e-12, atol=1e-12)


def test_time_plan_bounds_a_200000_token_document():
    """One 200,000-token document among ordinary ones: 48-token chunks everywhere would take
    4,167 sequential steps (625 s at 0.15 s each), over the budget; the plan keeps short chunks
    for each document's first 65,536 targets and takes 512 after, within the budget. With a budget
    that nothing fits, adaptation stops after the steps it allows, and the log line says so."""
    h = tg.Hyperparameters()
    lengths = [200_000] + [700] * 5_000
    plan, line = tg.lora_ttt_plan(lengths, h, 0.15, world_size=1)
    assert (plan.chunk, plan.long_chunk, plan.short_span, plan.max_steps) == (48, 512, 65_536, tg.UNLIMITED)
    assert plan.chunks(200_000) == 1366 + 263 and plan.chunks(700) == 15
    projected = 0.15 * max(plan.chunks(200_000), sum(plan.chunks(n) for n in lengths) / 64)
    assert projected <= h.lora_ttt_budget_seconds and f"projected {projected:.0f}s" in line and "first 65,536 targets, then 512" in line
    finer = tg.ChunkPlan(48, 512, 131_072)
    assert 0.15 * finer.chunks(200_000) > h.lora_ttt_budget_seconds  # the next finer plan would not fit
    everywhere, _ = tg.lora_ttt_plan([700] * 100, h, 0.15, world_size=1)
    assert everywhere.short_span == tg.UNLIMITED and everywhere.widest == 48
    capped, line = tg.lora_ttt_plan(lengths, tg.Hyperparameters(lora_ttt_budget_seconds=10.0), 0.15, world_size=1)
    assert capped.max_steps == 66 and capped.short_span == 0 and "cannot fit" in line and "after 66 steps" in line
    assert tg.lora_ttt_plan(lengths, h, None, 1)[0].short_span == tg.UNLIMITED  # no measured step time: no plan


def _planned_lora_on_rank(rank, world_size, tokens, tables, step_seconds):
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    h = _h(lora_ttt_budget_seconds=0.2)
    lines = []
    r = tg.evaluate_lora_ttt(_model().double(), tokens, tg.validation_target_bytes(tokens, tables), h, rt, log=lines.append, step_seconds=step_seconds[rank])
    return r.nll_sum, r.tokens, [l for l in lines if "time plan" in l]


def test_ranks_share_one_time_plan_made_with_the_slowest_step(tiny_data):
    """Each rank measures its own step time; they plan with the largest, so every rank cuts its
    documents the same way (with two fast ranks the plan is a finer one)."""
    tokens, tables, _ = _documents(tiny_data)
    (_, n0, plan0), (_, n1, plan1) = run_distributed(_planned_lora_on_rank, 2, tokens, tables, [0.002, 0.02])
    assert plan0 == plan1 and "20 ms per step" in plan0[0] and "then 16" in plan0[0] and n0 == n1 == len(tokens) - 1  # totals are all-reduced
    (_, _, fast0), (_, _, fast1) = run_distributed(_planned_lora_on_rank, 2, tokens, tables, [0.002, 0.002])
    assert fast0 == fast1 and fast0 != plan0


def test_chunk_slots_place_each_chunk_and_its_window_by_position_alone():
    """chunk_slots, the pure window function: a document's first short_span targets in chunks of
    `chunk`, then of `long_chunk`; each window ends where the chunk's grid slot ends, holds seq_len
    tokens and never starts before the document; a row not live gets zeros; where the document
    ends changes b only."""
    plan, seq_len = tg.ChunkPlan(8, 16, short_span=16), 32
    first, end, scored_to = torch.tensor([0, 100, 100, 50, 0]), torch.tensor([100, 400, 104, 60, 50]), torch.tensor([0, 300, 100, 60, 40])
    live = scored_to < end
    w, a, b = tg.chunk_slots(first, end, scored_to, live, plan, seq_len)
    assert live.tolist() == [True, True, True, False, True]
    assert a.tolist() == [0, 300, 100, 0, 40] and b.tolist() == [8, 316, 104, 0, 50]  # rows 1, 4 are past their first 16 targets: chunks of 16
    assert w.tolist() == [0, 284, 100, 0, 24]  # never before the document's start; rows 1, 4: the slot's end (316, 56) - 32
    longer = tg.chunk_slots(first, torch.tensor([100, 400, 400, 60, 400]), scored_to, live, plan, seq_len)
    assert longer[0].tolist() == w.tolist() and longer[2].tolist() == [8, 316, 108, 0, 56]  # the windows do not depend on where documents end


def _planned_scores(tokens, tables, plan, trace=None):
    """LoraTTT under `plan`, every document in one batch: per-target scores."""
    docs = tg.document_spans(tokens)
    recorder = Recorder(len(tokens) - 1)
    acc = tg._Accumulator(torch.device("cpu"), recorder)
    queue = [sorted(docs, key=lambda d: d[0] - d[1])]
    model = _model()
    with tg.frozen_weights(model):
        tg.LoraTTT(model, _h(lora_ttt_batch_docs=len(docs)), plan, tokens, tg.validation_target_bytes(tokens, tables)).score(lambda: queue.pop() if queue else None, acc)
    assert int(acc.count) == len(tokens) - 1
    if trace is not None:
        trace.extend(recorder.trace)
    return recorder.token_nll


def test_a_planned_grid_scores_every_target_once_and_stays_causal(tiny_data):
    """A plan with long chunks past each document's first 16 targets and a step cap: every target
    is scored once, chunks follow the grid, no document takes more steps than the cap, and
    tokens inserted late in a document (inside its last, partial long chunk) change no earlier
    score of it nor any score of another document."""
    tokens, tables, docs = _documents(tiny_data)
    plan = tg.ChunkPlan(CHUNK, 16, short_span=16, max_steps=4)
    trace = []
    base = _planned_scores(tokens, tables, plan, trace)
    assert not torch.isnan(base).any()
    steps = {}
    for event, doc, a, b in trace:
        size = CHUNK if a - doc < 16 else 16
        if event == "score":
            assert b - a == size or b == dict(docs)[doc]
        else:
            steps[doc] = steps.get(doc, 0) + 1
    assert max(steps.values()) == 4 and any(dict(docs)[d] - d > 16 + 4 * 16 for d in steps)
    first, end = max(docs, key=lambda d: d[1] - d[0])
    last = first + 16 + (end - first - 16 - 1) // 16 * 16  # its last long chunk's first target
    assert end - first > SEQ and 0 < end - last < 16  # long enough for the window to slide; the last chunk partial
    t = last + (end - last) // 2
    filler = torch.full((16 - (end - last),), 5, dtype=tokens.dtype)  # the chunk filled up to its full size
    longer = torch.cat([tokens[: t + 1], filler, tokens[t + 1 :]])
    nll = _planned_scores(longer, tables, plan)
    assert torch.equal(nll[:t], base[:t]), "a score before the inserted tokens moved"  # target t is now a filler token
    assert torch.equal(nll[end + len(filler) :], base[end:]), "a later document's score moved"


def test_progress_is_logged_every_progress_seconds(tiny_data, monkeypatch):
    """A line at least every PROGRESS_SECONDS of LoRA TTT (here 0: every chunk), with the targets
    scored so far (never decreasing), the batches claimed, the time and the plan's projected end."""
    tokens, tables, _ = _documents(tiny_data)
    monkeypatch.setattr(tg, "PROGRESS_SECONDS", 0.0)
    lines = []
    tg.evaluate_lora_ttt(_model(), tokens, tg.validation_target_bytes(tokens, tables), _h(), CPU, log=lines.append, step_seconds=0.01)
    progress = [line for line in lines if "targets scored on rank 0" in line]
    scored = [int(re.search(r"lora_ttt: ([\d,]+) targets", line).group(1).replace(",", "")) for line in progress]
    assert len(progress) > 10 and scored == sorted(scored) and scored[-1] < len(tokens) - 1
    assert all("batches up to" in line and "s elapsed" in line and "the plan's projected end" in line for line in progress)
    monkeypatch.setattr(tg, "PROGRESS_SECONDS", 30.0)
    lines.clear()
    tg.evaluate_lora_ttt(_model(), tokens, tg.validation_target_bytes(tokens, tables), _h(), CPU, log=lines.append)
    assert not any("targets scored on rank" in line for line in lines)  # a run shorter than 30 s has none
