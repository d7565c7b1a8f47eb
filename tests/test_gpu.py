"""GPU checks of the fused backend (run with a CUDA device; skipped elsewhere)."""

import math

import pytest
import torch

from myopia.attention import attention, causal_additive_mask, fused_attention_with_lse

pytestmark = pytest.mark.gpu


def _inputs(dtype, B=2, H=4, HKV=2, T=257, D=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).to("cuda", dtype).requires_grad_()
    q, k, v = make(H), make(HKV), make(HKV)
    do = torch.randn(B, H, T, D, generator=g).to("cuda", dtype)
    return q, k, v, do


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("mode", ["vanilla", "myopic", "myopic_kv"])
def test_cuda_fused_matches_float64_reference(dtype, tol, mode):
    q, k, v, do = _inputs(dtype)
    kp, vp = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    out = attention(q, k, v, cut=mode, backend="fused", **past)
    tensors = [q, k, v] + ([kp, vp] if past else [])
    grads = torch.autograd.grad(out, tensors, do)
    ref_t = [t.detach().double().requires_grad_() for t in tensors]
    ref_past = dict(k_past=ref_t[3], v_past=ref_t[4]) if past else {}
    ref = attention(*ref_t[:3], cut=mode, backend="reference", **ref_past)
    ref_grads = torch.autograd.grad(ref, ref_t, do.double())
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6) < tol


def _masks(T, B=2, window=5):
    causal = torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    padding = causal.expand(B, 1, T, T).clone()
    padding[0, :, :, :3] = False  # left padding of 3 keys in the first sequence
    padding[0, :, torch.arange(3), torch.arange(3)] = True
    sliding = causal & ~torch.ones(T, T, dtype=torch.bool, device="cuda").tril(-window)
    return {"padding": padding, "sliding": sliding, "additive": torch.zeros(B, 1, T, T, device="cuda").masked_fill(
        ~padding, float("-inf"))}


@pytest.mark.parametrize("T", [257, 64])  # a mask row length that is, and one that is not, a multiple of 8
@pytest.mark.parametrize("kind", ["padding", "sliding", "additive"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode", ["myopic", "myopic_kv"])
def test_cuda_masked_fused_matches_float64_reference(mode, dtype, tol, kind, T):
    """The masked path runs the memory-efficient kernel with the mask prepared as SDPA prepares it."""
    q, k, v, do = _inputs(dtype, T=T)
    mask = _masks(T)[kind]
    if mask.dtype != torch.bool:
        mask = mask.to(dtype)
    kp, vp = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    out = attention(q, k, v, cut=mode, backend="fused", attn_mask=mask, **past)
    tensors = [q, k, v] + ([kp, vp] if past else [])
    grads = torch.autograd.grad(out, tensors, do)
    ref_t = [t.detach().double().requires_grad_() for t in tensors]
    ref_past = dict(k_past=ref_t[3], v_past=ref_t[4]) if past else {}
    ref_mask = mask if mask.dtype == torch.bool else mask.double()
    ref = attention(*ref_t[:3], cut=mode, backend="reference", attn_mask=ref_mask, **ref_past)
    ref_grads = torch.autograd.grad(ref, ref_t, do.double())
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6) < tol


def test_cuda_float64_and_odd_head_sizes_route_to_a_kernel_that_takes_them():
    """float64 (no fused CUDA kernel) goes to the reference with a warning; head size 20 in
    float16 (not flash) and unequal value head sizes take the memory-efficient kernel."""
    from myopia.attention import kernels

    q, k, v, do = _inputs(torch.float64, T=33)
    assert kernels.select_kernel(q, k, v)[0] is None
    with pytest.warns(RuntimeWarning, match="float64"):
        out = attention(q, k, v, cut="myopic_kv")
    ref = attention(q, k, v, cut="myopic_kv", backend="reference")
    assert torch.equal(out, ref)
    q, k, v, do = _inputs(torch.float16, T=33, D=24)
    assert kernels.select_kernel(q, k, v)[0] == "efficient"
    v16 = torch.randn(*v.shape[:-1], 16, device="cuda", dtype=torch.float16).requires_grad_()
    assert kernels.select_kernel(q, k, v16)[0] == "efficient"
    out = attention(q, k, v16, cut="myopic_kv", backend="fused")
    ref_t = [t.detach().double().requires_grad_() for t in (q, k, v16)]
    ref = attention(*ref_t, cut="myopic_kv", backend="reference")
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_lse_matches_logsumexp(dtype):
    q, k, v, _ = _inputs(dtype, HKV=4)
    scale = 1 / math.sqrt(q.shape[-1])
    _, lse = fused_attention_with_lse(q.detach(), k.detach(), v.detach(), scale=scale)
    T = q.shape[-2]
    scores = q.double() @ k.double().transpose(-1, -2) * scale + causal_additive_mask(T, torch.float64, q.device)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-2, atol=1e-2)


def test_cuda_forward_identical_across_modes():
    q, k, v, _ = _inputs(torch.bfloat16)
    outs = [attention(q, k, v, cut=m, k_past=k, v_past=v) if m == "myopic" else attention(q, k, v, cut=m)
            for m in ("vanilla", "myopic", "myopic_kv")]
    assert torch.equal(outs[1], outs[2])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_diagonal_matches_torch(dtype):
    from myopia.attention import fused, kernels, triton_diag
    from myopia.attention.reference import expand_kv

    assert triton_diag.available(torch.empty(1, 1, 1, 64, device="cuda")), "triton kernel unavailable on CUDA"
    q, k, v, do = (t.detach() for t in _inputs(dtype))
    groups = q.shape[1] // k.shape[1]
    k_e, v_e = expand_kv(k, groups), expand_kv(v, groups)
    out, lse, extras = kernels.fused_forward(q, k_e, v_e, scale=0.125, mask=None)
    _, dkf, dvf = kernels.fused_backward(do, q, k_e, v_e, out, lse, extras, scale=0.125, mask=None)
    got = triton_diag.split_kv_grads(q, k, v, out, do, lse, dkf, dvf, scale=0.125, beta=0.3,
                                     want_past_k=True, want_past_v=True)
    want = fused._split_kv_grads_torch(q, k_e, v_e, out, do, lse, dkf, dvf, scale=0.125, beta=0.3, mask=None, horizon=0,
                                       groups=groups, need_cross=True, want_past_k=True, want_past_v=True)
    for a, b in zip(got, want):
        assert (a.float() - b.float()).abs().max() / b.float().abs().max() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("mode", ["myopic", "myopic_kv"])
def test_cuda_compiled_gpt_matches_eager(mode):
    from myopia import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128,
                          attention=mode, position="rotary")).cuda()
    x = torch.randint(0, 97, (4, 128), device="cuda")

    def grads(m):
        model.zero_grad(set_to_none=True)
        m(x).float().logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = grads(model)
    torch._dynamo.reset()
    compiled = grads(torch.compile(model, fullgraph=True))
    for a, b in zip(compiled, eager):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6


def test_cuda_deterministic_backward_repeats():
    from myopia import GPT, GPTConfig
    from myopia.train.loop import use_deterministic_kernels

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=128, block_size=512, attention="myopic")).cuda()
    x = torch.randint(0, 97, (8, 512), device="cuda")
    use_deterministic_kernels()
    try:
        runs = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
            runs.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
