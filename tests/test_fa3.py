"""FlashAttention-3 (Hopper) against PyTorch's attention, on the GPU, wherever flash_attn_interface
imports: the kernel itself (plain causal and the varlen path of DOC_MASK), inside the compiled
blocks (fullgraph: a graph break fails the compile), and the two evaluations that run it (LoRA
TTT's document rows and the sliding window). CI has no GPU: every test here skips there.
"""

import pytest
import torch

import train_gpt as tg
from conftest import tiny_hyperparameters

needs_fa3 = pytest.mark.skipif(not torch.cuda.is_available() or tg.flash_attn_3 is None, reason="FlashAttention-3 runs only on a Hopper GPU where flash_attn_interface imports")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fa3_hyperparameters(**overrides):
    """Head dim 64 and GQA 8/4 (what the FA3 build supports and the record runs), 4 layers."""
    values = dict(vocab_size=1024, model_dim=512, num_heads=8, num_kv_heads=4, rope_dims=16, mlp_mult=2, train_seq_len=256, eval_seq_len=256, eval_stride=64, eval_batch_seqs=4, lora_ttt_chunk_tokens=32, lora_ttt_batch_docs=4)
    values.update(overrides)
    return tiny_hyperparameters(**values)


def documents_ids(B, T, device="cuda"):
    ids = torch.randint(2, 1000, (B, T), device=device)
    ids[0, [0, T // 5, 2 * T // 3]] = tg.BOS_ID
    ids[1, T // 2] = tg.BOS_ID  # row 1 starts inside a document
    return ids


@needs_fa3
@pytest.mark.parametrize("doc_mask", [False, True])
def test_fa3_kernel_matches_sdpa_forward_and_gradients(doc_mask):
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 512, 8, 4, 64
    q, k, v = (torch.randn(B, T, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (H, Hkv, Hkv))
    ids = documents_ids(B, T)
    mask = tg.document_attention_mask(ids, "varlen") if doc_mask else None
    out = tg.causal_attention(q, k, v, "fa3", mask)
    grads = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))
    dense = tg.document_attention_mask(ids, "dense") if doc_mask else None
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = tg.causal_attention(*ref_inputs, "math", dense)
    ref_grads = torch.autograd.grad((ref**2).sum(), ref_inputs)
    assert out.shape == (B, T, H, D) and out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert relative_error(g, r) < 2e-2


def _compiled_model(backend: str, doc_mask: bool):
    h = fa3_hyperparameters(attention_backend=backend, doc_mask=doc_mask, compile=True)
    torch.manual_seed(0)
    kernels = tg.choose_kernels(h, torch.device("cuda"))
    tg.use_sdpa_backend(kernels)
    model = tg.GPT(h.model_config(), kernels).cuda()
    for p in model.parameters():  # the zero-initialised projections would hide the blocks
        p.data.add_(torch.randn_like(p) * 0.02)
    summary = tg.describe_kernels(kernels, h)
    torch._dynamo.reset()
    tg.compile_model(model)  # fullgraph=True: a graph break raises instead of splitting the block
    return model, h, summary


@needs_fa3
@pytest.mark.parametrize("doc_mask", [False, True])
def test_fa3_in_compiled_blocks_trains_like_cudnn(doc_mask):
    """A forward and backward of the compiled model (looping on, so the blocks run with skips and
    lanes as in training), FA3 against cuDNN (DOC_MASK: FA3 varlen against FlexAttention)."""
    ids = documents_ids(4, 257)
    results = {}
    for backend in ("fa3", "cudnn"):
        model, h, summary = _compiled_model(backend, doc_mask)
        assert f"attention {backend}" in summary
        if doc_mask:
            assert model.kernels.masks == ("varlen" if backend == "fa3" else "flex")
        model = model.using(looping=True)
        torch._dynamo.utils.counters.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tg.training_loss(model, ids[:, :-1], ids[:, 1:], h)
        loss.backward()
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        results[backend] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (loss_fa3, grads_fa3), (loss_cudnn, grads_cudnn) = results["fa3"], results["cudnn"]
    assert abs(loss_fa3.item() - loss_cudnn.item()) < 2e-3 * loss_cudnn.item()
    assert relative_error(grads_fa3, grads_cudnn) < 3e-2


@needs_fa3
def test_lora_ttt_rows_and_sliding_eval_through_fa3_match_cudnn():
    """The two evaluations that take the attention kernel most: LoRA TTT (per-document rows,
    forward and the adapters' backward) and the sliding window (forward only), on a stream of
    random documents; FA3 and cuDNN give the same scores within bf16 noise."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 1000, (4 * 1024 + 1,), generator=g)
    tokens[torch.randint(1, len(tokens) - 1, (9,), generator=g)] = tg.BOS_ID
    tokens[0] = tg.BOS_ID
    target_bytes = torch.ones(len(tokens) - 1, dtype=torch.int64)
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"))
    scores = {}
    for backend in ("fa3", "cudnn"):
        model, h, _ = _compiled_model(backend, False)
        model = model.using(looping=True)
        lora = tg.evaluate_lora_ttt(model, tokens, target_bytes, h, rt)
        sliding = tg.evaluate(model, tokens, target_bytes, tg.Windows(h.eval_seq_len, h.eval_stride, h.eval_batch_seqs), rt)
        assert lora.tokens == sliding.tokens == len(tokens) - 1
        scores[backend] = (lora.bpb, sliding.bpb)
    for fa3, cudnn in zip(scores["fa3"], scores["cudnn"]):
        assert abs(fa3 - cudnn) < 2e-3 * cudnn
