"""Generation on a CUDA card: the graph-replayed decode gives the eager tokens."""
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
