"""The attention op: fused backend against the eager reference, and the lse it relies on."""

import math

import pytest
import torch

from myopia.attention import Cut, attention, causal_additive_mask, fused, fused_attention_with_lse

B, H, HKV, T, D = 2, 4, 2, 33, 16


pytestmark = pytest.mark.usefixtures("cpu_backward")  # every test with both CPU backwards (conftest.py)


def test_each_cpu_backward_runs_where_it_should(cpu_backward, monkeypatch):
    calls = []
    original = fused.grouped_backward
    monkeypatch.setattr(fused, "grouped_backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    run("myopic", "fused", torch.float64)
    assert bool(calls) == (cpu_backward == "grouped")


def inputs(dtype, seed=0, kv_heads=HKV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(B, kv_heads, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(B, kv_heads, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    kp = k.detach().clone().requires_grad_()
    vp = v.detach().clone().requires_grad_()
    do = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, kp, vp, do


def run(mode, backend, dtype, beta=0.0, mask=None, kv_heads=HKV, horizon=None):
    q, k, v, kp, vp, do = inputs(dtype, kv_heads=kv_heads)
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    out = attention(q, k, v, cut=Cut(mode, beta=beta, horizon=horizon), backend=backend, attn_mask=mask, **past)
    tensors = [q, k, v] + ([kp, vp] if past else [])
    grads = torch.autograd.grad(out, tensors, do, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize(
    "mode,beta",
    [("vanilla", 0.0), ("myopic", 0.0), ("myopic", 0.4), ("myopic_kv", 0.0), ("myopic_kv", 0.4)],
)
def test_fused_matches_reference(dtype, tol, mode, beta):
    out_f, g_f = run(mode, "fused", dtype, beta)
    out_r, g_r = run(mode, "reference", dtype, beta)
    torch.testing.assert_close(out_f.double(), out_r.double(), rtol=tol, atol=tol)
    for a, b in zip(g_f, g_r):
        scale = b.double().abs().max().clamp_min(1.0)
        assert (a.double() - b.double()).abs().max() / scale < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("mode,beta", [("myopic", 0.0), ("myopic", 0.4), ("myopic_kv", 0.0), ("myopic_kv", 0.4)])
@pytest.mark.parametrize("horizon", [1, 5, 31])
def test_fused_horizon_matches_reference(dtype, tol, mode, beta, horizon):
    """The band's key/value gradient recomputed blockwise (fused) against the band mask (reference);
    T = 33 spans one full block of 64 keys and a partial one, horizon 31 reaches across."""
    out_f, g_f = run(mode, "fused", dtype, beta, horizon=horizon)
    out_r, g_r = run(mode, "reference", dtype, beta, horizon=horizon)
    torch.testing.assert_close(out_f.double(), out_r.double(), rtol=tol, atol=tol)
    myopic = run(mode, "reference", dtype, beta)[1]
    for a, b, c in zip(g_f, g_r, myopic):
        scale = b.double().abs().max().clamp_min(1.0)
        assert (a.double() - b.double()).abs().max() / scale < tol
    assert any((b.double() - c.double()).abs().max() > 1e-3 for b, c in zip(g_r, myopic)), "horizon must matter"


def test_fused_horizon_spans_several_blocks():
    """T = 150 keys in three blocks of 64; horizon 70 crosses a block boundary."""
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, 2, 150, 8, generator=g, dtype=torch.float64) for _ in range(4))
    kp, vp = k.clone(), v.clone()  # the past keys/values have the live ones' values
    grads = {}
    for backend in ("fused", "reference"):
        t = [x.clone().requires_grad_() for x in (q, k, v, kp, vp)]
        out = attention(t[0], t[1], t[2], cut="myopic:h=70", backend=backend, k_past=t[3], v_past=t[4])
        grads[backend] = torch.autograd.grad(out, t, do)
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_horizon_endpoints_are_the_myopic_and_vanilla_gradients_exactly():
    for backend in ("fused", "reference"):
        for mode in ("myopic", "myopic_kv"):
            assert all(torch.equal(a, b) for a, b in zip(run(mode, backend, torch.float64, horizon=0)[1],
                                                          run(mode, backend, torch.float64)[1]))
            vanilla = run("vanilla", backend, torch.float64)[1]
            for horizon in (T - 1, 1000):
                got = run(mode, backend, torch.float64, horizon=horizon)[1]
                assert all(torch.equal(a, b) for a, b in zip(got[:3], vanilla)), (backend, mode, horizon)


def test_padding_mask_fused_matches_reference():
    keep = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    keep[0, :, :, :5] = False  # left padding of 5 keys in the first sequence
    keep[0, :, torch.arange(5), torch.arange(5)] = True  # padded queries still see themselves
    for mode, horizon in (("myopic", None), ("myopic_kv", None), ("myopic", 3), ("myopic_kv", 7)):
        out_f, g_f = run(mode, "fused", torch.float64, mask=keep, horizon=horizon)
        out_r, g_r = run(mode, "reference", torch.float64, mask=keep, horizon=horizon)
        torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_f, g_r):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_lse_matches_logsumexp_of_masked_scores(dtype, tol):
    q, k, v, *_ = inputs(dtype, kv_heads=H)
    scale = 1 / math.sqrt(D)
    _, lse = fused_attention_with_lse(q.detach(), k.detach(), v.detach(), scale=scale)
    scores = q.double() @ k.double().transpose(-1, -2) * scale + causal_additive_mask(T, torch.float64, q.device)
    want = torch.logsumexp(scores, dim=-1)
    assert lse.shape == (B, H, T)
    torch.testing.assert_close(lse.double(), want, rtol=tol, atol=tol)


def test_forward_is_identical_across_modes():
    outs = {m: run(m, "fused", torch.float32)[0] for m in ("vanilla", "myopic", "myopic_kv")}
    assert torch.equal(outs["myopic"], outs["myopic_kv"])
    torch.testing.assert_close(outs["myopic"], outs["vanilla"], rtol=1e-6, atol=1e-6)


def test_myopic_key_value_gradient_is_own_position_only():
    """Perturbing k_j for j < i must not move dL_i/dk_j in myopic_kv: only own terms remain."""
    q, k, v, _, _, do = inputs(torch.float64, kv_heads=H)
    out = attention(q, k, v, cut="myopic_kv", backend="fused")
    _, dk, dv = torch.autograd.grad(out, [q, k, v], do)
    scale = 1 / math.sqrt(D)
    p_own = torch.exp((q * k).sum(-1) * scale - torch.logsumexp(
        q @ k.transpose(-1, -2) * scale + causal_additive_mask(T, torch.float64, q.device), -1))
    torch.testing.assert_close(dv, p_own.unsqueeze(-1) * do)


def test_bad_mode_and_missing_past_are_clear_errors():
    q, k, v, *_ = inputs(torch.float32)
    with pytest.raises(ValueError, match="attention mode 'sideways'"):
        attention(q, k, v, cut="sideways")
    with pytest.raises(ValueError, match="needs k_past"):
        attention(q, k, v, cut="myopic")
    with pytest.raises(ValueError, match="beta=1.5"):
        attention(q, k, v, cut="myopic_kv@1.5")
    with pytest.raises(ValueError, match="resolve it per block"):
        attention(q, k, v, cut="myopic_kv:layers=0")


def test_no_grad_myopic_uses_the_plain_kernel():
    q, k, v, kp, vp, _ = inputs(torch.float32)
    with torch.no_grad():
        a = attention(q, k, v, cut="myopic", k_past=kp, v_past=vp)
        b = attention(q, k, v, cut="vanilla")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode,horizon", [("myopic", None), ("myopic_kv", None), ("myopic", 3)])
def test_per_head_mask_with_grouped_queries_matches_reference(dtype, tol, mode, horizon):
    """A mask that differs per query head (B, H, T, T), with 2 query heads per key/value head: the
    grouped backward lays it out per key/value head and group; against the reference."""
    keep = torch.ones(B, H, T, T, dtype=torch.bool).tril()
    for h in range(H):
        keep[:, h, :, : h + 1] = False  # head h cannot see the first h + 1 keys ...
        keep[:, h, torch.arange(T), torch.arange(T)] = True  # ... except its own position
    out_f, g_f = run(mode, "fused", dtype, mask=keep, horizon=horizon)
    out_r, g_r = run(mode, "reference", dtype, mask=keep, horizon=horizon)
    torch.testing.assert_close(out_f.double(), out_r.double(), rtol=tol, atol=tol)
    for a, b in zip(g_f, g_r):
        scale = b.double().abs().max().clamp_min(1.0)
        assert (a.double() - b.double()).abs().max() / scale < tol


def test_band_with_a_query_broadcast_mask_over_several_chunks():
    """A (B, 1, 1, T) key mask beside causality, T = 150 over three key chunks, horizon 5: the band's
    chunked recomputation (the flash path) slices a broadcast query dimension correctly."""
    g = torch.Generator().manual_seed(3)
    T_ = 150
    q, k, v, do = (torch.randn(1, 2, T_, 8, generator=g, dtype=torch.float64) for _ in range(4))
    keys = torch.ones(1, 1, 1, T_, dtype=torch.bool)
    keys[..., 140:] = False  # the last keys are padding
    causal = torch.ones(T_, T_, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 1, T_, dtype=torch.float64).masked_fill(~keys, float("-inf"))
    full = torch.zeros(T_, T_, dtype=torch.float64).masked_fill(~causal, float("-inf")) + mask
    grads = {}
    for backend, m in (("fused", full), ("reference", full)):
        t = [x.clone().requires_grad_() for x in (q, k, v, k, v)]
        out = attention(t[0], t[1], t[2], cut="myopic:h=5", backend=backend, attn_mask=m, k_past=t[3], v_past=t[4])
        grads[backend] = torch.autograd.grad(out[..., :140, :], t, do[..., :140, :])
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    out = fused.band_kv_grads(q, k, v, q.new_zeros(q.shape), do, torch.zeros(1, 2, T_, dtype=torch.float64), 0.3,
                              5, mask)  # the broadcast mask itself reaches the chunks without an error
    assert out[0].shape == k.shape
