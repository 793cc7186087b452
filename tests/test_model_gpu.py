"""Generation on a CUDA card: the graph-replayed decode gives the eager tokens."""
import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from workers.dist import init_distributed, shutdown  # noqa: E402
from workers.model import PRESETS, Generator, build_model, forward_full  # noqa: E402


@pytest.fixture(scope="module")
def model():
    init_distributed(1)
    m = build_model(PRESETS["llama-tiny"], weights="random", dtype="float32", device="cuda:0", seed=3,
                    max_batch_size=4, max_seq_len=300)
    yield m
    shutdown()


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
def test_graph_decode_matches_eager_and_full_forward(model, fuse):
    model.fuse = fuse
    prompts = [[1, 7, 8, 9, 10], [1, 42], [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]
    graph = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=True)
    eager = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=False)
    out_g = graph.generate(prompts, max_new_tokens=200, eos_id=None)  # crosses key buckets
    out_e = eager.generate(prompts, max_new_tokens=200, eos_id=None)
    # the fused step reads each row's used slots with the bounds on the device: one graph
    assert graph.use_graph and (len(graph._graphs) == 1 if fuse else len(graph._graphs) >= 2)
    assert out_g == out_e and all(len(o) == 200 for o in out_g)
    seq = list(prompts[1])
    for _ in range(20):
        seq.append(int(forward_full(model, torch.tensor([seq]))[0, -1].argmax()))
    assert out_g[1][:20] == seq[2:]


@pytest.mark.parametrize("b,hq,hkv,s,d,dtype,splits", [
    (1, 32, 32, 384, 128, torch.bfloat16, None),  # LLaMA-7B, batch 1: split keys, merge kernel
    (64, 32, 32, 384, 128, torch.bfloat16, None),  # batch 64: one chunk per head
    (4, 8, 1, 300, 128, torch.float16, 3),  # grouped-query (70B on 8 shards), long chunks
    (2, 32, 1, 100, 128, torch.bfloat16, None),  # more query heads a key/value head than 16
    (2, 4, 4, 2100, 64, torch.bfloat16, None),  # a long cache: chunks of several blocks
    (3, 8, 8, 77, 32, torch.float32, 1),  # llama-tiny's head size, odd cache length, one chunk
    (2, 6, 2, 50, 24, torch.float32, None),  # head size not a power of two
])
def test_used_slots_attention_kernel_matches_reference(b, hq, hkv, s, d, dtype, splits):
    from workers.model.attention import decode_attention, decode_attention_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype, generator=g)
    k_all = torch.randn(b + 1, hkv, s, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b + 1, hkv, s, d, device="cuda", dtype=dtype, generator=g)[:b]  # a slice, as the cache is
    pads = torch.randint(0, s // 3, (b,), device="cuda", generator=g)
    for last in (s // 3, s // 2, s - 1):  # pos somewhere inside a chunk, and the very end
        pos = torch.tensor([last], device="cuda")
        k = k_all.clone()[:b]
        k[:, :, last + 1:] = 1e4  # stale slots past pos must not count
        ref = decode_attention_reference(q.double(), k.double(), v.double(), pads, pos)
        out = decode_attention(q, k, v, pads, pos, splits=splits)
        tol = 2e-2 if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_used_slots_attention_reads_an_fp8_cache():
    from workers.model.attention import decode_attention, decode_attention_reference
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(8, 32, 384, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    v = torch.randn(8, 32, 384, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    pads, pos = torch.zeros(8, dtype=torch.long, device="cuda"), torch.tensor([300], device="cuda")
    ref = decode_attention_reference(q.double(), k.double(), v.double(), pads, pos)
    torch.testing.assert_close(decode_attention(q, k, v, pads, pos).double(), ref, rtol=2e-2, atol=2e-2)


def test_fp8_cache_graph_decode_matches_eager():
    """An 8-bit cache: the compiled cache writes and the kernel's reads under a CUDA
    graph give the eager step's tokens."""
    m = build_model(PRESETS["llama-tiny"], weights="random", dtype="bfloat16", device="cuda:0", seed=5,
                    max_batch_size=2, max_seq_len=128, kv_cache_dtype="float8_e4m3fn")
    assert m.layers[0].attention.cache_k.dtype == torch.float8_e4m3fn and m.fuse
    prompts = [[1, 7, 8, 9, 10], [1, 42]]
    out_g = Generator(m, max_batch_size=2, max_seq_len=128, device="cuda:0").generate(
        prompts, max_new_tokens=60, eos_id=None)
    out_e = Generator(m, max_batch_size=2, max_seq_len=128, device="cuda:0", cuda_graph=False).generate(
        prompts, max_new_tokens=60, eos_id=None)
    assert out_g == out_e and all(len(o) == 60 for o in out_g)


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 11008), (96, 200)])  # 7B's wo, w2-like, ragged
def test_skinny_products_match_cublas(m, n, k):
    from workers.model import linear

    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = torch.nn.functional.linear(x, w).float()
    torch.testing.assert_close(linear.skinny_linear(x, w).float(), ref, rtol=2e-2, atol=2e-2)
    wide = torch.zeros(9000, k, device="cuda", dtype=torch.bfloat16)
    rows = lambda r: torch.zeros(r, k, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    assert linear.usable(x, n) and not linear.usable(x.float(), n)  # float32 stays on cuBLAS (no TF32)
    assert linear.usable(rows(64), 4096) and not linear.usable(rows(65), 4096)  # narrow: up to 64 rows
    assert linear.usable(rows(16), wide.shape[0]) and not linear.usable(rows(17), wide.shape[0])  # wide: 16


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("n,k,slices", [(4096, 4096, 1), (4096, 4096, 2), (1000, 11008, 2), (96, 256, 1)])
def test_tma_products_match_cublas(m, n, k, slices):
    """The TMA kernel whole and as partial products (ragged output bands, masked rows)."""
    from workers.model import linear

    if not linear.tma_usable(torch.zeros(1, 128, device="cuda", dtype=torch.bfloat16),
                             torch.zeros(128, 128, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("needs Triton's TMA descriptors and a Hopper-class card")
    g = torch.Generator(device="cuda").manual_seed(4)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    assert linear.tma_usable(x, w, slices)
    got = linear.tma_linear(x, w, slices)
    assert got.shape == ((m, n) if slices == 1 else (slices, m, n))
    got = got.float() if slices == 1 else got.float().sum(0)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    rows = lambda r, dtype=torch.bfloat16: torch.zeros(r, k, device="cuda", dtype=dtype)  # noqa: E731
    assert not linear.tma_usable(rows(65), w) and not linear.tma_usable(rows(1, torch.float32), w)
    w896 = torch.zeros(8, 896, device="cuda", dtype=torch.bfloat16)  # 7 blocks of 128: whole, not in halves
    x896 = torch.zeros(1, 896, device="cuda", dtype=torch.bfloat16)
    assert linear.tma_usable(x896, w896, 1) and not linear.tma_usable(x896, w896, 2)
    assert not linear.tma_usable(x896, torch.zeros(8, 897, device="cuda", dtype=torch.bfloat16)[:, 1:])


def _tiny_bf16_model():
    return build_model(PRESETS["llama-tiny"], weights="random", dtype="bfloat16", device="cuda:0", seed=5,
                       max_batch_size=1, max_seq_len=64)


def _one_decode_step(m) -> torch.Tensor:
    """The logits of one decode step of one row (token 5 at slot 6), over caches refilled
    with the same noise each call, so that two decode paths see the same state."""
    for layer in m.layers:
        layer.attention.cache_k.normal_(generator=torch.Generator(device="cuda").manual_seed(9))
        layer.attention.cache_v.normal_(generator=torch.Generator(device="cuda").manual_seed(8))
    tokens, positions = torch.tensor([[5]], device="cuda"), torch.tensor([[6]], device="cuda")
    slots, pads = torch.tensor([6], device="cuda"), torch.tensor([0], device="cuda")
    return m(tokens, positions, slots, None, 0, pads=pads)


def test_tma_step_matches_cublas_step(model, monkeypatch):  # the fixture joins the process group
    """One fused bf16 decode step with the products on the TMA kernel and on cuBLAS: the
    same logits up to bf16 rounding, and the kernel really ran (q/k/v, w1/w3 and wo's partials)."""
    from workers.model import linear

    calls = []
    real = linear.tma_linear
    monkeypatch.setattr(linear, "tma_linear", lambda x, w, s=1, c=None, role=None: calls.append(s) or real(x, w, s, c, role))
    m = _tiny_bf16_model()
    if not linear.tma_usable(torch.zeros(1, m.args.dim, device="cuda", dtype=torch.bfloat16),
                             m.layers[0].attention.wo.weight):
        pytest.skip("needs Triton's TMA descriptors and a Hopper-class card")
    monkeypatch.setattr(linear, "TMA_WIDTHS", frozenset({m.args.dim}))  # the tiny model's width too
    monkeypatch.setattr(linear, "TMA_EAGER", True)  # this step runs eagerly, outside a graph
    out = {}
    for tma in (False, True):
        monkeypatch.setattr(linear, "TMA", tma)
        out[tma] = _one_decode_step(m)
    assert calls.count(1) == 2 * len(m.layers) and calls.count(linear.SPLIT_K_SLICES) >= len(m.layers)
    torch.testing.assert_close(out[True], out[False], rtol=3e-2, atol=3e-2)
    assert out[True].float().std() > 0


def test_tma_products_run_in_the_graph_and_not_eagerly(model, monkeypatch):  # the fixture joins the process group
    """A decode step captured as a CUDA graph takes the TMA kernel; the same step run eagerly
    keeps cuBLAS (the kernel's host launch cost is larger). (Their tokens may differ: random
    weights and bf16 rounding of two kernels; test_tma_step_matches_cublas_step compares logits.)"""
    from workers.model import linear

    calls = []
    real = linear.tma_linear
    monkeypatch.setattr(linear, "tma_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _tiny_bf16_model()
    if not linear.tma_usable(torch.zeros(1, m.args.dim, device="cuda", dtype=torch.bfloat16),
                             m.layers[0].attention.wo.weight):
        pytest.skip("needs Triton's TMA descriptors and a Hopper-class card")
    monkeypatch.setattr(linear, "TMA_WIDTHS", frozenset({m.args.dim}))
    prompts = [[1, 7, 8, 9, 10]]
    out = {}
    for graph in (False, True):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture falls back to eager with a warning
            gen = Generator(m, max_batch_size=1, max_seq_len=64, device="cuda:0", cuda_graph=graph)
            out[graph] = gen.generate(prompts, max_new_tokens=12, eos_id=None)
        assert (len(calls) > 0) == graph, (graph, len(calls))
        assert bool(gen.use_graph and gen._graphs) == graph
    assert len(out[True][0]) == len(out[False][0]) == 12


@pytest.mark.parametrize("nq,nkv,cache_dtype", [(32, 32, torch.bfloat16), (8, 2, torch.bfloat16),
                                                (4, 4, torch.float8_e4m3fn)])
def test_rope_cache_kernel_matches_compiled_function(nq, nkv, cache_dtype):
    from workers.model import fused

    b, d, s, slot = 3, 128, 40, 17
    g = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(b, 1, nq + 2 * nkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    angles = torch.rand(b, 1, 1, d // 2, device="cuda", generator=g) * 6.28
    cos_sin = torch.stack((angles.cos(), angles.sin()), dim=-1)
    slots = torch.tensor([slot], device="cuda")
    caches = [torch.zeros(b + 1, nkv, s, d, device="cuda", dtype=cache_dtype)[:b] for _ in range(4)]
    q_ref = fused.rope_cache(qkv, cos_sin, caches[0], caches[1], slots, nq, nkv)
    q = fused.rope_cache_triton(qkv, cos_sin, caches[2], caches[3], slots, nq, nkv)
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding step apart at most
    tol = dict(rtol=0.13, atol=0.02) if cache_dtype == torch.float8_e4m3fn else dict(rtol=1e-2, atol=1e-2)
    for ref, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got.float(), ref.float(), **tol)
        assert got[:, :, slot].float().abs().sum() > 0 and got[:, :, :slot].float().abs().sum() == 0


def test_partial_products_step_matches_cublas_split_k(model, monkeypatch):  # the fixture joins the process group
    """One fused decode step at batch 1 with wo and w2 as partial sums folded into the next
    norm (the default at few rows) and with cuBLAS's own products: the same logits up to
    bf16 rounding."""
    from workers.model import linear

    calls = []
    real = linear.partial_products
    monkeypatch.setattr(linear, "partial_products", lambda x, w, s=None: calls.append(1) or real(x, w, s))
    monkeypatch.setattr(linear, "TMA", False)  # wo and w2 through partial_products, not the TMA kernel

    m = _tiny_bf16_model()
    x = torch.zeros(1, 1, m.args.dim, device="cuda", dtype=torch.bfloat16)
    assert linear.split_k_usable(x, m.layers[0].attention.wo.weight)
    out = {}
    for split in (False, True):
        monkeypatch.setattr(linear, "SPLIT_K", split)
        out[split] = _one_decode_step(m)
        assert len(calls) == (2 * len(m.layers) if split else 0)
    torch.testing.assert_close(out[True], out[False], rtol=3e-2, atol=3e-2)
    assert out[True].float().std() > 0


def test_hand_kernels_step_matches_compiled_step(model):  # the fixture joins the process group
    """One fused decode step of a bf16 model with the hand-written kernels and without:
    the same logits up to bf16 rounding, the same cache contents."""
    from workers.model import fused, linear

    try:
        m = build_model(PRESETS["llama-tiny"], weights="random", dtype="bfloat16", device="cuda:0", seed=5,
                        max_batch_size=4, max_seq_len=64)
        tokens = torch.tensor([[5], [9], [200]], device="cuda")
        positions = torch.tensor([[6], [3], [0]], device="cuda")
        slots, pads = torch.tensor([6], device="cuda"), torch.tensor([0, 3, 6], device="cuda")
        out = {}
        for hand in (False, True):  # with the hand-written kernels: rotary/cache and skinny products
            fused.HAND_KERNELS = linear.SKINNY = hand
            for layer in m.layers:
                layer.attention.cache_k.normal_(generator=torch.Generator(device="cuda").manual_seed(9))
                layer.attention.cache_v.normal_(generator=torch.Generator(device="cuda").manual_seed(8))
            out[hand] = (m(tokens, positions, slots, None, 0, pads=pads),
                         m.layers[-1].attention.cache_k[:3, :, 6].clone())
        torch.testing.assert_close(out[True][0], out[False][0], rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-2, atol=1e-2)
    finally:
        fused.HAND_KERNELS, linear.SKINNY = True, False


@pytest.mark.parametrize("nq,nkv,t,cache_dtype", [(32, 32, 128, torch.bfloat16), (8, 2, 7, torch.bfloat16),
                                                  (12, 4, 33, torch.bfloat16), (4, 4, 5, torch.float8_e4m3fn)])
def test_rope_cache_rows_kernel_matches_function(nq, nkv, t, cache_dtype):
    """The prefill's kernel (T tokens a row, heads in blocks, ragged last block) against
    the uncompiled function: same q, same cache slots written, nothing else touched."""
    from workers.model import fused

    b, d, s, first = 3, 128, 200, 9
    g = torch.Generator(device="cuda").manual_seed(4)
    qkv = torch.randn(b, t, nq + 2 * nkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    angles = torch.rand(b, t, 1, d // 2, device="cuda", generator=g) * 6.28
    cos_sin = torch.stack((angles.cos(), angles.sin()), dim=-1)
    slots = torch.arange(first, first + t, device="cuda")
    bases = [torch.zeros(b + 1, nkv, s, d, device="cuda", dtype=cache_dtype) for _ in range(4)]
    caches = [base[:b] for base in bases]  # as the model passes them: views of a larger cache
    q_ref = fused.rope_cache(qkv, cos_sin, caches[0], caches[1], slots, nq, nkv)
    q = fused.rope_cache_rows_triton(qkv, cos_sin, caches[2], caches[3], slots, nq, nkv)
    assert q.shape == (b, nq, t, d)
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding step apart at most
    tol = dict(rtol=0.13, atol=0.02) if cache_dtype == torch.float8_e4m3fn else dict(rtol=1e-2, atol=1e-2)
    exact = dict(rtol=0, atol=0) if cache_dtype == torch.bfloat16 else tol  # values are copied, not computed
    for ref, got, kw in ((caches[0], caches[2], tol), (caches[1], caches[3], exact)):
        torch.testing.assert_close(got.float(), ref.float(), **kw)
        assert got[:, :, first:first + t].float().abs().amin(dim=-1).gt(0).float().mean() > 0.5
        assert got[:, :, :first].float().abs().sum() == 0 and got[:, :, first + t:].float().abs().sum() == 0
    assert all(base[b].float().abs().sum() == 0 for base in bases)  # no write past the batch's rows


def test_fused_prefill_matches_plain_prefill_and_compiles_once(model, monkeypatch):  # fixture: process group
    """A bf16 prefill on the fused path (compiled add + norm and SiLU-mul for any width, the
    rows kernel) against the plain path: the same logits up to bf16 rounding and the same
    caches; a prompt batch of another width reuses the compiled kernels."""
    import torch._dynamo.utils as dutils

    from workers.model import fused
    from workers.model.generate import left_pad

    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 0)  # small prompts, so that the test stays quick

    m = build_model(PRESETS["llama-tiny"], weights="random", dtype="bfloat16", device="cuda:0", seed=6,
                    max_batch_size=4, max_seq_len=64)
    out = {}
    for width in (9, 14):
        prompts = [[1] + [(7 * i + j) % 500 + 2 for j in range(width - 1 - i)] for i in range(3)]
        tokens, pads = left_pad(prompts, rows=4)
        if width == 14:
            frames = dict(dutils.counters["stats"]).get("unique_graphs", 0)
        for fuse in (False, True):
            m.fuse = fuse
            logits = forward_full(m, tokens, pads)
            first, last = m.layers[0].attention, m.layers[-1].attention
            out[(width, fuse)] = (logits, first.cache_k[:4, :, :width].clone(), first.cache_v[:4, :, :width].clone(),
                                  last.cache_k[:4, :, :width].clone(), last.cache_v[:4, :, :width].clone())
        got, want = out[(width, True)], out[(width, False)]
        torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=3e-2)
        # the first layer's input is the same in both paths: values copied exactly, keys
        # one bf16 rounding apart; deeper layers see the residual stream rounded differently
        torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
        for g_, w_ in zip(got[3:], want[3:]):
            torch.testing.assert_close(g_.float(), w_.float(), rtol=3e-2, atol=3e-2)
        assert got[0].float().std() > 0
    assert dict(dutils.counters["stats"]).get("unique_graphs", 0) == frames  # the second width compiled nothing
    errors = fused.status()["errors"]
    assert "add_rms_norm_rows" not in errors and "silu_mul_rows" not in errors, errors
    assert {"add_rms_norm_rows", "silu_mul_rows"} <= set(fused.status()["compiled"])


def test_first_generate_compiles_the_fused_prefill_for_every_later_width(model, monkeypatch):
    """Which prompt batches reach the fused prefill depends on their width: the first
    generate call compiles its kernels on dummy tokens, so that a wide batch later (inside
    a measured window, in a cell) compiles nothing; its tokens equal the plain prefill's."""
    import torch._dynamo.utils as dutils

    from workers.model import fused

    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 64)  # 4 rows: the fused prefill from 16 tokens
    model.fuse = True
    narrow = [[1, 7, 8], [1, 42], [1, 5, 5, 5]]  # 4 x 4 rows: the plain prefill
    wide = [[1] + [(5 * i + j) % 300 + 2 for j in range(30 - 3 * i)] for i in range(3)]
    gen = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=True)
    gen.generate(narrow, max_new_tokens=8, eos_id=None)
    frames = dict(dutils.counters["stats"]).get("unique_graphs", 0)
    calls = []
    real = fused.rope_cache_rows
    monkeypatch.setattr(fused, "rope_cache_rows", lambda qkv, *a: calls.append(qkv.shape) or real(qkv, *a))
    out = gen.generate(wide, max_new_tokens=40, eos_id=None)
    assert calls and calls[0][:2] == (4, 31)
    assert dict(dutils.counters["stats"]).get("unique_graphs", 0) == frames
    monkeypatch.setattr(fused, "PREFILL", False)
    plain = Generator(model, max_batch_size=4, max_seq_len=300, device="cuda:0", cuda_graph=True)
    assert plain.generate(wide, max_new_tokens=40, eos_id=None) == out


def test_eager_generator_batch_of_one_wide_prompt_compiles_nothing(model, monkeypatch):  # fixture: process group
    """Without CUDA graphs a batch is as many rows as prompts: a last batch of one wide
    prompt takes the fused prefill with batch 1, after the first call compiled it at another
    batch size. The prefill's functions take (rows, features), so that compiles nothing."""
    import torch._dynamo.utils as dutils

    from workers.model import fused

    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 32)
    m = build_model(PRESETS["llama-tiny"], weights="random", dtype="bfloat16", device="cuda:0", seed=8,
                    max_batch_size=4, max_seq_len=128)
    gen = Generator(m, max_batch_size=4, max_seq_len=128, device="cuda:0", cuda_graph=False)
    gen.generate([[1, 5, 6], [1, 7]], max_new_tokens=4, eos_id=None)  # warms the prefill at 4 rows x 8 tokens
    frames = dict(dutils.counters["stats"]).get("unique_graphs", 0)
    calls = []
    real = fused.rope_cache_rows
    monkeypatch.setattr(fused, "rope_cache_rows", lambda qkv, *a: calls.append(qkv.shape) or real(qkv, *a))
    # 1 row x 41 tokens, prefill only: eager decode steps of a new batch size compile their own
    gen.generate([[1] + list(range(2, 42))], max_new_tokens=1, eos_id=None)
    assert calls and calls[0][:2] == (1, 41)
    assert dict(dutils.counters["stats"]).get("unique_graphs", 0) == frames
    errors = fused.status()["errors"]
    assert "add_rms_norm_rows" not in errors and "silu_mul_rows" not in errors, errors
