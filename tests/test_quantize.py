"""GPTQ + SDClip, calibration Hessians, the artifact's round trip, its size guard and the
self-extracting code copy."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT, tiny_hyperparameters
from distributed import run_distributed


def test_sdclip_scale_formula():
    W = torch.randn(5, 300) * torch.tensor([0.1, 1.0, 3.0, 0.01, 7.0])[:, None]
    scale = tg.sdclip_scales(W, clip_k=12.85, qmax=31)
    expected = 12.85 * W.std(dim=-1) / 31
    assert torch.allclose(scale, expected, rtol=1e-3)  # fp16 rounding
    assert torch.equal(scale, scale.half().float())  # exactly what the artifact stores


def _correlated_problem(rows=64, cols=128, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) * (torch.rand(cols, generator=g) ** 4)[None, :]
    X = torch.randn(n, cols, generator=g) @ mixing + 0.05 * torch.randn(n, cols, generator=g)
    W = torch.randn(rows, cols, generator=g) * 0.02
    return W, X


def _output_error(W, codes, scale, X):
    Wq = codes.float() * scale[:, None]
    return ((X @ (W - Wq).T) ** 2).sum().item()


@pytest.mark.parametrize("qmax, clip_k", [(31, 12.85), (7, 4.0)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(qmax, clip_k):
    W, X = _correlated_problem()
    H = X.T @ X
    codes, scale = tg.gptq_quantize(W[None], H[None], qmax, clip_k, block_size=32)
    rtn_codes, rtn_scale = tg.round_to_nearest(W, qmax, clip_k)
    assert torch.equal(scale[0], rtn_scale)
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax
    gptq_err, rtn_err = _output_error(W, codes[0], scale[0], X), _output_error(W, rtn_codes, rtn_scale, X)
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)


def test_gptq_batched_equals_one_by_one_and_handles_dead_inputs():
    problems = [_correlated_problem(seed=s) for s in range(3)]
    W = torch.stack([w for w, _ in problems])
    H = torch.stack([x.T @ x for _, x in problems])
    H[1, :, 5] = H[1, 5, :] = 0  # input 5 of matrix 1 never fires
    codes, scales = tg.gptq_quantize(W, H, 31, 12.85, block_size=32)
    for i in range(3):
        c, s = tg.gptq_quantize(W[i : i + 1], H[i : i + 1], 31, 12.85, block_size=32)
        assert torch.equal(codes[i], c[0]) and torch.equal(scales[i], s[0])
    assert (codes[1, :, 5] == 0).all()


def _tiny_model_and_hessians(h, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(h)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    hessians = {}
    for name, module in tg.quantized_matrices(model).items():
        d = module.in_features if module is not None else h.model_dim
        X = torch.randn(256, d)
        hessians[name] = X.T @ X
    return model, hessians


def test_quantize_model_plan(cpu_runtime):
    h = tiny_hyperparameters()
    model, hessians = _tiny_model_and_hessians(h)
    q = tg.quantize_model(model, hessians, h, cpu_runtime)
    assert set(q) == set(model.state_dict())
    for name, t in q.items():
        if name in tg.quantized_matrices(model):
            qmax = 127 if name == "tok_emb.weight" else 31
            assert isinstance(t, tg.QuantizedTensor) and t.codes.abs().max() <= qmax
            rel = (t.dequantize() - model.state_dict()[name]).norm() / model.state_dict()[name].norm()
            assert rel < 0.2, name
        else:
            assert t.dtype == torch.float16
    with pytest.raises(ValueError, match="above PASSTHROUGH_MAX_NUMEL=10"):
        tg.quantize_model(model, hessians, tiny_hyperparameters(passthrough_max_numel=10), cpu_runtime)


def _quantize_on_rank(rank, world_size):
    h = tiny_hyperparameters()
    model, hessians = _tiny_model_and_hessians(h)
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    return {k: (v.codes, v.scale) if isinstance(v, tg.QuantizedTensor) else v for k, v in tg.quantize_model(model, hessians, h, rt).items()}


def test_gptq_split_across_ranks_matches_one_rank():
    single = _quantize_on_rank(0, 1)
    for result in run_distributed(_quantize_on_rank, 2):
        assert result.keys() == single.keys()
        for k, v in single.items():
            if isinstance(v, tuple):
                assert torch.equal(result[k][0], v[0]) and torch.equal(result[k][1], v[1]), k
            else:
                assert torch.equal(result[k], v), k


def test_calibration_hessians_are_x_transpose_x_of_training_batches(tiny_data, cpu_runtime):
    root, _ = tiny_data
    h = tiny_hyperparameters(data_dir=str(root))
    model = tg.GPT(h)
    model.looping = True
    files = tg.find_shards(h, "train")
    loader = lambda: tg.TrainLoader(files, h.train_seq_len, 3, 0, 1, 7, h.vocab_size, cpu_runtime.device)
    hessians = tg.collect_hessians(model, loader(), num_seqs=5, rt=cpu_runtime)
    assert set(hessians) == set(tg.quantized_matrices(model))
    # independent computation of two of them from the same five sequences
    l = loader()
    x = torch.cat([l.next_batch()[0], l.next_batch()[0]])[:5]
    inputs = []
    hook = model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].float().reshape(-1, a[0].size(-1))))
    with tg.autocast(cpu_runtime.device):
        hidden = model.hidden_states(x).float().reshape(-1, h.model_dim)
    hook.remove()
    assert len(inputs) == 2  # block 1 runs twice with depth recurrence; both passes count
    X = torch.cat(inputs)
    assert torch.allclose(hessians["blocks.1.mlp.proj.weight"], X.T @ X, rtol=1e-4, atol=1e-3)
    assert torch.allclose(hessians["tok_emb.weight"], hidden.T @ hidden, rtol=1e-4, atol=1e-3)


def test_byte_shuffle_round_trip():
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    shuffled = tg.byte_shuffle(data, 2)
    assert shuffled[:500] == data[0::2] and tg.byte_unshuffle(shuffled, 2) == data


@pytest.mark.parametrize("method", ["brotli", "zstd", "lzma"])
def test_compression_round_trip(method):
    data = np.random.default_rng(1).normal(0, 3, 20000).round().astype(np.int8).tobytes()
    packed = tg.compress(data, method, 5)
    assert tg.decompress(packed) == data and len(packed) < len(data)


def _gptq_like_codes(n, qmax=31, clip_k=12.85, seed=0):
    w = np.random.default_rng(seed).standard_t(6, size=n)
    return np.clip(np.round(w / max(w.std(), 1e-9) * qmax / clip_k), -qmax, qmax).astype(np.int64) + qmax


@pytest.mark.parametrize("n", [1, 1023, 1024, 5000, 70001])
def test_rans_round_trip(n):
    symbols = _gptq_like_codes(n, seed=n)
    data = tg.rans_encode(symbols, 63)
    decoded, used = tg.rans_decode(data + b"trailing bytes belong to the next section")
    assert np.array_equal(decoded, symbols) and used == len(data)


def test_rans_edge_alphabets():
    one_symbol = np.full(3000, 7)
    decoded, _ = tg.rans_decode(tg.rans_encode(one_symbol, 63))
    assert np.array_equal(decoded, one_symbol)
    wide = np.random.default_rng(0).integers(0, 255, 50000)  # int8 alphabet, every symbol used
    wide[:3] = (0, 254, 254)
    decoded, _ = tg.rans_decode(tg.rans_encode(wide, 255))
    assert np.array_equal(decoded, wide)


def test_rans_reaches_the_entropy_and_beats_brotli():
    import brotli

    symbols = _gptq_like_codes(2_000_000)
    p = np.bincount(symbols) / len(symbols)
    p = p[p > 0]
    ideal = len(symbols) * -(p * np.log2(p)).sum() / 8
    size = len(tg.rans_encode(symbols, 63))
    assert size < ideal * 1.001 + 4 * tg.RANS_LANES + 200  # payload + lane states + table
    assert size < 0.995 * len(brotli.compress((symbols - 31).astype(np.int8).tobytes(), quality=11, lgwin=24))


def test_rans_detects_corruption():
    data = bytearray(tg.rans_encode(_gptq_like_codes(20000), 63))
    data[len(data) // 2] ^= 0x55
    with pytest.raises(ValueError, match="corrupt rANS stream"):
        tg.rans_decode(bytes(data))


def test_artifact_round_trip_is_exact(cpu_runtime):
    h = tiny_hyperparameters(compress_level=5)
    model, hessians = _tiny_model_and_hessians(h)
    q = tg.quantize_model(model, hessians, h, cpu_runtime)
    blob = tg.pack_artifact(q, h, looping=True)
    state, looping = tg.unpack_artifact(blob, h)
    assert looping is True and list(state) == list(model.state_dict())
    for name, t in q.items():
        expected = t.dequantize() if isinstance(t, tg.QuantizedTensor) else t.float()
        assert torch.equal(state[name], expected), name
    loaded = tg.GPT(h)
    loaded.load_state_dict(state)  # loads into the architecture without missing keys


def test_artifact_rejects_other_architectures_and_garbage(cpu_runtime):
    h = tiny_hyperparameters(compress_level=5)
    model, hessians = _tiny_model_and_hessians(h)
    blob = tg.pack_artifact(tg.quantize_model(model, hessians, h, cpu_runtime), h, looping=False)
    with pytest.raises(ValueError, match="trained with NUM_LAYERS=4, but NUM_LAYERS=5 now"):
        tg.unpack_artifact(blob, tiny_hyperparameters(num_layers=5))
    with pytest.raises(ValueError, match="bad magic"):
        tg.unpack_artifact(b"junk" + blob, h)


def test_size_guard():
    assert tg.check_artifact_size(15_000_000, 999_999) == 15_999_999
    with pytest.raises(tg.ArtifactTooLarge, match=r"16,000,000 bytes \(weights 15,950,000 \+ code 50,000\)"):
        tg.check_artifact_size(15_950_000, 50_000)
    with pytest.raises(tg.ArtifactTooLarge, match="no score is reported"):
        tg.check_artifact_size(16_000_001, 0)


def test_self_extracting_copy_runs_and_equals_the_source(tmp_path):
    source = (ROOT / "train_gpt.py").read_bytes()
    packed = tg.self_extracting_source(source)
    assert len(packed) < len(source) / 2
    path = tmp_path / "train_gpt.py"
    path.write_bytes(packed)
    probe = (
        "import runpy, sys, lzma, base64;"
        f"g = runpy.run_path({str(path)!r}, run_name='probe');"
        "print(g['ARTIFACT_LIMIT_BYTES'], g['Hyperparameters']().num_layers)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["16000000", "11"]
    payload = packed.split(b"b85decode(b'")[1].split(b"')")[0]
    import base64, lzma

    assert lzma.decompress(base64.b85decode(payload)) == source
