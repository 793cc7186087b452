"""The model on the CPU: cached decode against a full forward, EOS, checkpoints and resharding."""
import pytest
import torch

from workers import dist as wdist
from workers.model import ModelArgs, PRESETS, Generator, build_model, forward_full, save_checkpoint
from workers.model.checkpoint import _slice_for_rank

TINY = ModelArgs.from_dict({**PRESETS["llama-tiny"].to_dict(), "n_kv_heads": 4})  # grouped-query attention too


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    import os

    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    real = wdist._from_submitit
    wdist._from_submitit = lambda: None
    wdist.init_distributed(1)
    yield
    wdist.shutdown()
    wdist._from_submitit = real
    os.environ.update(saved)


def tiny(seed=0, weights="random", args=TINY):
    return build_model(args, weights=weights, dtype="float32", device="cpu", seed=seed,
                       max_batch_size=4, max_seq_len=96)


def greedy_full(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(forward_full(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_decode_matches_full_forward_for_every_padded_row():
    model = tiny()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 42], [1, 3, 3, 3]]
    gen = Generator(model, max_batch_size=4, max_seq_len=96, device="cpu", kv_bucket=8)
    out = gen.generate(prompts, max_new_tokens=20, eos_id=None)  # crosses key buckets
    assert [len(o) for o in out] == [20, 20, 20]
    for prompt, got in zip(prompts, out):
        assert got == greedy_full(model, prompt, 20)


def test_padded_prefill_logits_match_unpadded():
    model = tiny()
    from workers.model.generate import left_pad

    tokens, pads = left_pad([[1, 9, 8, 7, 6], [1, 2]], rows=2)
    batched = forward_full(model, tokens, pads)
    alone = forward_full(model, torch.tensor([[1, 2]]))
    torch.testing.assert_close(batched[1, -2:], alone[0], rtol=1e-4, atol=1e-4)


def test_random_weights_give_exactly_max_new_tokens_and_phases_in_order():
    model = tiny()
    phases = []
    out = Generator(model, max_batch_size=4, max_seq_len=96, device="cpu").generate(
        [[1, 2, 3]] * 3, max_new_tokens=17, eos_id=None, on_phase=phases.append)
    assert phases == ["prefill", "decode"] and all(len(o) == 17 for o in out)
    assert Generator(model, max_batch_size=4, max_seq_len=96, device="cpu").generate(
        [[1]], max_new_tokens=0, eos_id=None) == [[]]


def test_checkpoint_weights_stop_at_eos(tmp_path):
    save_checkpoint(tiny(seed=5), tmp_path, n_files=1)
    model = tiny(weights=str(tmp_path))
    prompt = [1, 11, 12, 13]
    free = greedy_full(model, prompt, 30)
    eos = free[3]
    k = free.index(eos)  # first time the model says this token
    gen = Generator(model, max_batch_size=4, max_seq_len=96, device="cpu", eos_check_every=4)
    out = gen.generate([prompt], max_new_tokens=60, eos_id=eos)
    assert out == [free[:k]]
    assert int(gen._state["step"]) < 60  # the loop stopped early, not at max_new_tokens


def test_checkpoint_round_trip_over_file_counts(tmp_path):
    model = tiny(seed=2)
    tokens = torch.tensor([[1, 4, 9, 16, 25, 36]])
    ref = forward_full(model, tokens)
    for n_files in (1, 2, 4):
        save_checkpoint(model, tmp_path / str(n_files), n_files=n_files)
        assert len(list((tmp_path / str(n_files)).glob("consolidated.*.pth"))) == n_files
        again = tiny(weights=str(tmp_path / str(n_files)))
        torch.testing.assert_close(forward_full(again, tokens), ref, rtol=0, atol=0)


def test_checkpoint_shape_mismatch_is_an_error(tmp_path):
    save_checkpoint(tiny(), tmp_path, n_files=1)
    with pytest.raises(ValueError, match="dim=256 but the model config says 128"):
        tiny(weights=str(tmp_path), args=ModelArgs.from_dict({**TINY.to_dict(), "dim": 128}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny(weights=str(tmp_path / "nope"))


@pytest.mark.parametrize("n_files,world", [(8, 4), (8, 16), (1, 2), (2, 4), (4, 1)])
def test_reshard_slices_cover_the_full_tensor(n_files, world):
    full = torch.arange(64 * 3).reshape(64, 3)
    files = [{"layers.0.attention.wq.weight": c, "layers.0.attention.wo.weight": c.T.contiguous()}
             for c in full.chunk(n_files, dim=0)]
    per = 64 // world
    rows = [_slice_for_rank("layers.0.attention.wq.weight", (per, 3), files.__getitem__, n_files, r, world, None)
            for r in range(world)]
    cols = [_slice_for_rank("layers.0.attention.wo.weight", (3, per), files.__getitem__, n_files, r, world, None)
            for r in range(world)]
    assert torch.equal(torch.cat(rows, 0), full) and torch.equal(torch.cat(cols, 1), full.T)


def test_model_args_errors_and_presets():
    with pytest.raises(ValueError, match="unknown model arguments \\['dims'\\]"):
        ModelArgs.from_dict({"dims": 3})
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by shards=3"):
        PRESETS["llama-tiny"].check_shards(3)
    assert abs(PRESETS["llama-7b"].n_params() - 6.74e9) < 0.01e9
    assert abs(PRESETS["llama2-70b"].n_params() - 68.98e9) < 0.01e9


def test_generator_rejects_bad_requests():
    gen = Generator(tiny(), max_batch_size=2, max_seq_len=32, device="cpu")
    with pytest.raises(ValueError, match="batch of 3 prompts; valid: 1..2"):
        gen.generate([[1]] * 3, max_new_tokens=2, eos_id=None)
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        gen.generate([[1] * 20], max_new_tokens=20, eos_id=None)
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[]], max_new_tokens=2, eos_id=None)


def _decode_fused_vs_plain(model, prompts, n):
    outs = {}
    for fuse in (False, True):
        model.fuse = fuse
        outs[fuse] = Generator(model, max_batch_size=4, max_seq_len=96, device="cpu", kv_bucket=8).generate(
            prompts, max_new_tokens=n, eos_id=None)
    model.fuse = False
    return outs


def test_fused_decode_step_matches_plain_path():
    """The fused decode path (rotary + cache writes, add + RMSNorm, SiLU-mul) run uncompiled:
    same cache contents, same step logits, same tokens as the plain path, GQA included."""
    from workers.model import fused
    from workers.model.generate import additive

    saved, fused.COMPILE = fused.COMPILE, False
    try:
        model = tiny(seed=4)
        assert model.fuse is False  # the CPU default
        prompts = [[1, 5, 6, 7, 8, 9], [1, 42], [1, 3, 3, 3]]
        outs = _decode_fused_vs_plain(model, prompts, 20)
        assert outs[True] == outs[False] and all(len(o) == 20 for o in outs[True])
        # one decode step by hand, both paths from the same cache state
        tokens = torch.tensor([[1, 9, 8, 7]])
        forward_full(model, tokens)
        slot, kv_len = torch.tensor([4]), 8
        allowed = (torch.arange(kv_len) <= 4).view(1, 1, 1, kv_len)
        step = {}
        for fuse in (False, True):
            model.fuse = fuse
            forward_full(model, tokens)
            step[fuse] = model(torch.tensor([[11]]), torch.tensor([[4]]), slot, additive(allowed, torch.float32), kv_len)
            step[(fuse, "k")] = model.layers[1].attention.cache_k[:1, :, :5].clone()
            step[(fuse, "v")] = model.layers[1].attention.cache_v[:1, :, :5].clone()
        model.fuse = False
        torch.testing.assert_close(step[True], step[False], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[(True, "k")], step[(False, "k")], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(step[(True, "v")], step[(False, "v")], rtol=0, atol=0)
        # the same step with the used-slots attention (pads, no mask) gives the same logits
        model.fuse = True
        forward_full(model, tokens)
        dyn = model(torch.tensor([[11]]), torch.tensor([[4]]), slot, None, kv_len, pads=torch.tensor([0]))
        model.fuse = False
        torch.testing.assert_close(dyn, step[False], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="plain path needs a mask"):
            model(torch.tensor([[11]]), torch.tensor([[4]]), slot, None, kv_len, pads=torch.tensor([0]))
    finally:
        fused.COMPILE = saved


def test_fused_prefill_matches_plain_path(monkeypatch):
    """A padded prefill on the fused path (rotary + cache writes in one call, pending
    residual adds folded into the norms), run uncompiled: the logits of every position
    and both caches of every layer equal the plain path's, grouped-query heads included."""
    from workers.model import fused
    from workers.model.generate import left_pad

    monkeypatch.setattr(fused, "COMPILE", False)
    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 0)  # the CUDA default keeps small prefills plain
    serves = fused.prefill_serves
    monkeypatch.setattr(fused, "prefill_serves", lambda head_dim, device: True)  # CUDA only otherwise
    calls = []
    real = fused.rope_cache_rows
    monkeypatch.setattr(fused, "rope_cache_rows", lambda qkv, *a: calls.append(qkv.shape) or real(qkv, *a))
    model = tiny(seed=5)
    tokens, pads = left_pad([[1, 9, 8, 7, 6, 5, 4], [1, 2], [1, 3, 3, 3]], rows=3)
    out, caches = {}, {}
    for fuse in (False, True):
        model.fuse = fuse
        for layer in model.layers:  # stale cache contents must not matter
            layer.attention.cache_k.normal_()
            layer.attention.cache_v.normal_()
        out[fuse] = forward_full(model, tokens, pads)
        out[(fuse, "last")] = forward_full(model, tokens, pads, last_only=True)
        caches[fuse] = [(a.cache_k[:3, :, :7].clone(), a.cache_v[:3, :, :7].clone())
                        for a in (layer.attention for layer in model.layers)]
    assert len(calls) == 2 * len(model.layers) and calls[0][1] == 7  # every layer, both fused calls
    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 22)  # 3 rows x 7 tokens = 21: below, the plain path
    forward_full(model, tokens, pads)
    monkeypatch.setattr(fused, "PREFILL_MIN_ROWS", 0)
    monkeypatch.setattr(fused, "prefill_serves", lambda head_dim, device: False)  # e.g. an odd head size
    forward_full(model, tokens, pads)
    model.fuse = False
    assert len(calls) == 2 * len(model.layers)
    assert not serves(128, torch.device("cpu")) and not serves(96, torch.device("cuda"))
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[(True, "last")], out[False][:, -1:], rtol=1e-5, atol=1e-5)
    for (k1, v1), (k0, v0) in zip(caches[True], caches[False]):
        torch.testing.assert_close(k1, k0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)


def test_partial_products_sum_to_the_product_and_the_norm_adds_them():
    """Row-parallel products at few rows as partial sums (linear.partial_products): they
    add up to F.linear, and fused.add_norm folds them into the residual add + norm."""
    from workers.model import fused, linear

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 1, 12, generator=g), torch.randn(5, 12, generator=g)
    for s in (2, 3, 4):
        parts = linear.partial_products(x, w, s)
        assert parts.shape == (s, 2, 1, 5)
        torch.testing.assert_close(parts.sum(0), torch.nn.functional.linear(x, w))
    resid, weight = torch.randn(2, 1, 5, generator=g), torch.rand(5, generator=g) + 0.5
    parts = linear.partial_products(x, w, 2)
    want = fused.add_rms_norm(resid, parts.sum(0), weight, 1e-5)
    got = fused.add_norm(resid, parts, weight, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert not linear.split_k_usable(x, w)  # measured on CUDA only: the CPU keeps F.linear


def test_fused_decode_step_with_partial_products_matches_plain_path(monkeypatch):
    """The fused step with wo and w2 as partial sums (the CUDA default at few rows,
    switched on here for the CPU) decodes the same tokens as the plain path."""
    from workers.model import fused, linear

    monkeypatch.setattr(fused, "COMPILE", False)
    monkeypatch.setattr(linear, "split_k_usable", lambda x, w: x.numel() // x.shape[-1] <= 4)
    calls = []
    real = linear.partial_products
    monkeypatch.setattr(linear, "partial_products", lambda x, w, s=None: calls.append(x.shape) or real(x, w, s))
    model = tiny(seed=7)
    outs = _decode_fused_vs_plain(model, [[1, 5, 6, 7, 8], [1, 42], [1, 3, 3]], 16)
    assert outs[True] == outs[False] and all(len(o) == 16 for o in outs[True])
    # wo and w2 of every layer took the partial products at every fused decode step
    assert calls and len(calls) % (2 * len(model.layers)) == 0


@pytest.mark.parametrize("multiple_of,w2_fits", [(256, True), (896, False)])
def test_fused_decode_step_takes_tma_products_where_they_serve(monkeypatch, multiple_of, w2_fits):
    """Where the TMA kernel serves (one GPU, up to TMA_MAX_ROWS rows, a model width in
    TMA_WIDTHS, a product in TMA_ROLES, K cut into whole blocks per slice), q/k/v and w1/w3
    take it whole and wo and w2 as partials, and decode the plain path's tokens; anywhere
    else cuBLAS. Only the platform check is stood in for (the kernel needs a Hopper card:
    tests/test_model_gpu.py), and a stand-in computes the kernel's values. An FFN of 768
    cuts into two slices of 384 = 3 x 128; one of 896 into two of 448, so w2 stays off."""
    import torch.nn.functional as F

    from workers.model import fused, linear

    monkeypatch.setattr(fused, "COMPILE", False)
    monkeypatch.setattr(linear, "split_k_usable", lambda x, w: x.numel() // x.shape[-1] <= 4)
    monkeypatch.setattr(linear, "tma_platform", lambda x: True)
    monkeypatch.setattr(linear, "TMA_EAGER", True)  # the CPU captures no CUDA graph
    calls = []

    def stand_in(x, w, slices=1, config=None, role=None):
        calls.append((tuple(w.shape), slices))
        assert role in shapes and tuple(w.shape) == shapes[role], role  # settings are chosen by role
        return F.linear(x, w) if slices == 1 else linear.partial_products(x, w, slices)

    monkeypatch.setattr(linear, "tma_linear", stand_in)
    a = ModelArgs.from_dict({**TINY.to_dict(), "multiple_of": multiple_of})
    model, prompts = tiny(seed=7, args=a), [[1, 5, 6, 7, 8], [1, 42], [1, 3, 3]]
    assert a.ffn_hidden_dim == {256: 768, 896: 896}[multiple_of]
    shapes = {"wqkv": ((a.n_heads + 2 * a.kv_heads) * a.head_dim, a.dim), "w13": (2 * a.ffn_hidden_dim, a.dim),
              "wo": (a.dim, a.n_heads * a.head_dim), "w2": (a.dim, a.ffn_hidden_dim)}
    slices = {"wqkv": 1, "w13": 1, "wo": linear.SPLIT_K_SLICES, "w2": linear.SPLIT_K_SLICES}
    every = set(shapes) if w2_fits else set(shapes) - {"w2"}
    plain = _decode_fused_vs_plain(model, prompts, 4)[False]
    cases = [  # (settings, the products that take the kernel); the limits are inclusive
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA_MAX_ROWS": len(prompts)}, every),
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA_ROLES": frozenset({"w13", "w2"})}, {"w13", "w2"} & every),
        ({"TMA_WIDTHS": frozenset({a.dim + 1})}, set()),
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA_MAX_ROWS": len(prompts) - 1}, set()),
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA": False}, set()),
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA_EAGER": False}, set()),  # an eager step keeps cuBLAS
        # a product's own BLOCK_K decides: 256 does not cut w2's slices (384 or 448) into whole blocks
        ({"TMA_WIDTHS": frozenset({a.dim}), "TMA_ROLE_SETTINGS": {"w2": (64, 256, 4, 3)}}, every - {"w2"}),
    ]
    for settings, roles in cases:
        calls.clear()
        with monkeypatch.context() as m:
            for name, value in settings.items():
                m.setattr(linear, name, value)
            assert _decode_fused_vs_plain(model, prompts, 4)[True] == plain, settings
        steps = len(calls) // max(1, len(roles) * a.n_layers)
        assert sorted(calls) == sorted([(shapes[r], slices[r]) for r in roles] * a.n_layers * steps), settings
        assert (steps > 0) == bool(roles), settings
    calls.clear()  # eager steps take the kernel inside as_in_graph (warm-up before a capture, profiles)
    with monkeypatch.context() as m:
        m.setattr(linear, "TMA_WIDTHS", frozenset({a.dim}))
        m.setattr(linear, "TMA_EAGER", False)
        with linear.as_in_graph():
            assert _decode_fused_vs_plain(model, prompts, 4)[True] == plain
        assert not linear._AS_IN_GRAPH
    assert {shape for shape, _ in calls} == {shapes[r] for r in every}


def test_tma_shape_rules_and_refusal():
    """The kernel's loop over a K slice has no mask, so K must cut into whole BLOCK_K blocks
    per slice, and its tile holds 64 rows; tma_linear refuses anything else."""
    from workers.model import linear

    assert linear.tma_shapes_fit(1, 896, 1, 128) and not linear.tma_shapes_fit(1, 896, 2, 128)  # 448 = 3.5 blocks
    assert linear.tma_shapes_fit(4, 11008, 2, 128) and not linear.tma_shapes_fit(4, 11008, 2, 256)
    assert not linear.tma_shapes_fit(1, 4096, 3, 128)
    assert linear.tma_shapes_fit(64, 4096, 1, 128) and not linear.tma_shapes_fit(65, 4096, 1, 128)
    assert not linear.tma_shapes_fit(5, 4096, 1, 128, max_rows=4)
    assert linear.tma_config(1) == linear.TMA_WIDE and linear.tma_config(2) == linear.TMA_PARTIALS
    roles = {role: (64, 256, 4, 3) for role in ("wqkv", "w2")}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(linear, "TMA_ROLE_SETTINGS", roles)
        assert linear.tma_config(1, "wqkv") == linear.tma_config(2, "w2") == (64, 256, 4, 3)
        assert linear.tma_config(1, "w13") == linear.TMA_WIDE and linear.tma_config(2, "wo") == linear.TMA_PARTIALS
        m.setattr(linear, "tma_platform", lambda x: True)
        # a role's own BLOCK_K decides whether its K cuts into whole blocks: 11008 / 2 is not 256s
        w2 = torch.zeros(4096, 11008)
        assert linear.tma_usable(torch.zeros(1, 11008), w2, 2) and not linear.tma_usable(torch.zeros(1, 11008), w2, 2, role="w2")
    with pytest.raises(ValueError, match="BLOCK_K"):
        linear.tma_prepare(torch.zeros(1, 256), torch.zeros(128, 256), 2, (64, 256, 4, 3))
    with pytest.raises(ValueError, match="64 rows"):
        linear.tma_prepare(torch.zeros(65, 256), torch.zeros(128, 256), 1, (64, 128, 4, 4))
    assert not linear.tma_usable(torch.zeros(1, 256), torch.zeros(128, 256))  # the CPU: never


def test_used_slots_attention_reference_by_hand():
    """Row b attends to slots pads[b]..pos only (padding and stale slots past pos are
    ignored), grouped-query heads share their key/value head."""
    from workers.model.attention import decode_attention, decode_attention_reference

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, s, d = 3, 4, 2, 10, 8
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    pads, pos = torch.tensor([0, 2, 5]), torch.tensor([6])
    out = decode_attention_reference(q, k, v, pads, pos)
    for row in range(b):
        for head in range(hq):
            keys = k[row, head // 2, pads[row]: 7]
            w = torch.softmax(keys @ q[row, head, 0] / d ** 0.5, dim=0)
            torch.testing.assert_close(out[row, head, 0], w @ v[row, head // 2, pads[row]: 7])
    # on the CPU the public entry point is the reference
    torch.testing.assert_close(decode_attention(q, k, v, pads, pos), out)


def test_generator_refuses_used_slots_attention_on_the_plain_path():
    model = tiny(seed=1)
    with pytest.raises(ValueError, match="needs the model's fused decode path"):
        Generator(model, max_batch_size=2, max_seq_len=32, device="cpu", dynamic_kv=True)


@pytest.mark.slow
def test_fused_decode_compiled_matches_plain_path():
    """The same with the fused functions compiled by Inductor (C++ on the CPU)."""
    from workers.model import fused

    model = tiny(seed=6)
    outs = _decode_fused_vs_plain(model, [[1, 5, 6, 7], [1, 2]], 12)
    errors = {k: v for k, v in fused.status()["errors"].items() if k in ("add_rms_norm", "rope_cache", "silu_mul")}
    if errors:
        pytest.skip(f"torch.compile unavailable here: {errors}")
    # (add_partials_rms_norm too, where an earlier test compiled it)
    assert {"add_rms_norm", "rope_cache", "silu_mul"} <= set(fused.status()["compiled"])
    assert outs[True] == outs[False]


def test_fp8_cache_stores_8_bit_keys_and_both_paths_agree():
    """kv_cache_dtype=float8_e4m3fn: the cache holds 8-bit values (1 byte a number), and the
    plain and fused decode paths (uncompiled on the CPU) give the same tokens from it."""
    from workers.model import fused

    saved, fused.COMPILE = fused.COMPILE, False
    try:
        m = build_model(PRESETS["llama-tiny"], weights="random", dtype="float32", device="cpu", seed=3,
                        max_batch_size=2, max_seq_len=64, kv_cache_dtype="float8_e4m3fn")
        assert m.layers[0].attention.cache_k.dtype == torch.float8_e4m3fn
        assert m.layers[0].attention.cache_k.element_size() == 1
        outs = {}
        for fuse in (False, True):
            m.fuse = fuse
            outs[fuse] = Generator(m, max_batch_size=2, max_seq_len=64, device="cpu").generate(
                [[1, 5, 6], [1, 9]], max_new_tokens=16, eos_id=None)
        assert outs[True] == outs[False]
        assert m.layers[0].attention.cache_k[0, :, 3].float().abs().sum() > 0  # written
        with pytest.raises(ValueError, match="valid: \\['auto', 'float8_e4m3fn'\\]"):
            build_model(PRESETS["llama-tiny"], weights="random", dtype="float32", device="cpu", seed=3,
                        max_batch_size=2, max_seq_len=64, kv_cache_dtype="int8")
    finally:
        fused.COMPILE = saved


def test_prefill_leaves_cudnn_attention_out(monkeypatch):
    """cuDNN builds a plan per new (batch, width): prefill of prompt batches of varying
    widths must not run through it, or the builds land in the measured window."""
    import contextlib

    from torch.nn.attention import SDPBackend

    from workers.model import generate

    seen = []

    @contextlib.contextmanager
    def record(backends):
        seen.append(list(backends))
        with torch.nn.attention.sdpa_kernel(backends):
            yield

    monkeypatch.setattr(generate, "sdpa_kernel", record)
    model = tiny(seed=2)
    Generator(model, max_batch_size=2, max_seq_len=32, device="cpu").generate([[1, 5, 6], [1]], max_new_tokens=3,
                                                                            eos_id=None)
    assert seen and all(SDPBackend.CUDNN_ATTENTION not in b and SDPBackend.EFFICIENT_ATTENTION in b for b in seen)


def test_compiled_function_past_the_recompile_limit_keeps_its_compiled_shapes(monkeypatch):
    """One shape too many for torch.compile's cache (many model shapes in one process) runs
    that call unfused with one warning; the function is not switched off for the shapes it
    has compiled (a permanent error would be)."""
    import torch._dynamo

    from workers.model import fused

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))  # no C++ build
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(fused, "COMPILE", True)

    def double(x):
        return x * 2

    f = fused._Compiled(double)
    assert f(torch.ones(3)).tolist() == [2.0] * 3
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        assert f(torch.ones(2, 2)).tolist() == [[2.0, 2.0]] * 2
    assert f.over_limit and f.error is None
    assert f(torch.ones(3)).tolist() == [2.0] * 3
