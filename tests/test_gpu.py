"""GPU checks of the fused backend (run with a CUDA device; skipped elsewhere)."""

import math

import pytest
import torch

from myopia.attention import attention, causal_additive_mask, fused_attention_with_lse

pytestmark = pytest.mark.gpu


def _inputs(dtype, B=2, H=4, HKV=2, T=257, D=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).to("cuda", dtype).requires_grad_()  # noqa: E731
    q, k, v = make(H), make(HKV), make(HKV)
    do = torch.randn(B, H, T, D, generator=g).to("cuda", dtype)
    return q, k, v, do


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("mode", ["vanilla", "myopic", "myopic_kv"])
def test_cuda_fused_matches_float64_reference(dtype, tol, mode):
    q, k, v, do = _inputs(dtype)
    kp, vp = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    out = attention(q, k, v, mode=mode, backend="fused", **past)
    tensors = [q, k, v] + ([kp, vp] if past else [])
    grads = torch.autograd.grad(out, tensors, do)
    ref_t = [t.detach().double().requires_grad_() for t in tensors]
    ref_past = dict(k_past=ref_t[3], v_past=ref_t[4]) if past else {}
    ref = attention(*ref_t[:3], mode=mode, backend="reference", **ref_past)
    ref_grads = torch.autograd.grad(ref, ref_t, do.double())
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6) < tol


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
    outs = [attention(q, k, v, mode=m, k_past=k, v_past=v) if m == "myopic" else attention(q, k, v, mode=m)
            for m in ("vanilla", "myopic", "myopic_kv")]
    assert torch.equal(outs[1], outs[2])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
