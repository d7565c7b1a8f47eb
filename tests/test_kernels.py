"""The fused kernels' preconditions and inputs, checked on the CPU: which kernel takes which inputs
(stated CUDA capabilities), the mask as the memory-efficient kernel needs it (CUDA-shaped inputs
through a stand-in kernel that enforces its checks), unequal value head sizes, and which errors the
eager fallback may catch."""

import math
import sys
import types

import pytest
import torch

from myopia.attention import attention, kernels
from myopia.attention.reference import causal_additive_mask

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


pytestmark = pytest.mark.usefixtures("cpu_backward")  # every test with both CPU backwards (conftest.py)


@pytest.mark.parametrize("device,dtype,qk,v,mask,cap,want", [
    ("cuda", F16, 64, 64, False, (8, 0), "flash"),
    ("cuda", BF16, 128, 128, False, (9, 0), "flash"),
    ("cuda", F16, 64, 64, True, (8, 0), "efficient"),      # flash takes no mask
    ("cuda", F16, 64, 64, False, (7, 5), "efficient"),     # flash needs sm80
    ("cuda", BF16, 64, 64, False, (7, 5), None),           # bf16 needs sm80 in every kernel
    ("cuda", F16, 60, 60, False, (9, 0), None),            # not a multiple of 8
    ("cuda", F32, 60, 60, False, (9, 0), "efficient"),     # float32 aligns to 4
    ("cuda", F16, 192, 128, False, (9, 0), "efficient"),   # unequal value head size: not flash
    ("cuda", F16, 512, 512, False, (9, 0), "efficient"),   # flash: head size <= 256
    ("cuda", F32, 64, 64, False, (9, 0), "efficient"),     # flash: half precision only
    ("cuda", F64, 64, 64, False, (9, 0), None),            # no fused CUDA kernel takes float64
    ("cuda", F16, 64, 64, False, (3, 7), None),
    ("cpu", F64, 24, 8, True, None, "cpu"),
    ("mps", F32, 64, 64, False, None, None),
])
def test_kernel_routing_follows_each_kernels_preconditions(device, dtype, qk, v, mask, cap, want):
    kind, reason = kernels.choose_kernel(device, dtype, qk, v, mask, cap)
    assert kind == want
    assert (reason == "") == (want is not None)


def test_attention_without_a_kernel_runs_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(kernels, "select_kernel", lambda *a, **k: (None, "stated: no kernel"))
    monkeypatch.setattr(sys.modules["myopia.attention.dispatch"], "_warned", set())
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=F64, requires_grad=True) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="stated: no kernel"):
        out = attention(q, k, v, cut="myopic_kv")
    want = attention(q, k, v, cut="myopic_kv", backend="reference")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stated: no kernel"):
        attention(q, k, v, cut="myopic_kv", backend="fused")


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])


@pytest.mark.parametrize("shape", [(2, 1, 7, 7), (7, 7), (2, 4, 7, 7), (2, 1, 16, 16)])
def test_efficient_mask_prepared_as_sdpa_does(shape):
    q, k = torch.empty(2, 4, 7 if shape[-1] == 7 else 16, 16), torch.empty(2, 4, shape[-1], 16)
    mask = torch.randn(shape)
    got = kernels.prepare_efficient_mask(mask, q, k)
    assert got.shape == (2, 4, q.shape[2], k.shape[2])
    assert _aligned(got)
    torch.testing.assert_close(got, mask.expand(got.shape), rtol=0, atol=0)
    if _aligned(mask):
        assert got.data_ptr() == mask.data_ptr()  # no copy when already aligned


def _efficient_stand_in():
    """The memory-efficient CUDA kernel's interface on the CPU, with its checks on the bias (expanded
    to (B, H, Tq, Tk), rows aligned to 8 elements); the values come from the eager formula."""

    def check(bias, q, k):
        if bias is None:
            return
        if tuple(bias.shape) != (q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
            raise RuntimeError(f"attn_bias: wrong shape {tuple(bias.shape)}")
        if not _aligned(bias):
            raise RuntimeError("attn_bias is not correctly aligned")

    def scores(q, k, bias, causal, scale):
        s = q @ k.transpose(-1, -2) * scale
        if causal:
            s = s + causal_additive_mask(q.shape[2], q.dtype, q.device)
        return s if bias is None else s + bias

    def forward(q, k, v, bias, compute_lse, dropout, causal, *, scale):
        check(bias, q, k)
        s = scores(q, k, bias, causal, scale)
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1), torch.tensor(0), torch.tensor(0)

    def backward(dout, q, k, v, bias, out, lse, seed, offset, dropout, grad_mask, causal, *, scale):
        check(bias, q, k)  # closed form: this runs inside a custom op, where autograd does not record
        p = torch.softmax(scores(q, k, bias, causal, scale), -1)
        ds = p * (dout @ v.transpose(-1, -2) - (dout * (p @ v)).sum(-1, keepdim=True))
        return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ dout, None

    return types.SimpleNamespace(_scaled_dot_product_efficient_attention=forward,
                                 _scaled_dot_product_efficient_attention_backward=backward)


@pytest.mark.parametrize("mode", ["myopic", "myopic_kv"])
def test_masked_fused_path_hands_the_efficient_kernel_a_prepared_mask(monkeypatch, mode):
    """CUDA-shaped inputs (a (B, 1, T, T) padding mask, T not a multiple of 8) through the fused op's
    memory-efficient branch, forward and backward, against the eager reference."""
    B, H, T, D = 2, 4, 7, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    kp, vp = (t.detach().clone().requires_grad_() for t in (k, v))
    keep = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    keep[0, :, :, :2] = False
    keep[0, :, torch.arange(2), torch.arange(2)] = True
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    tensors = [q, k, v] + ([kp, vp] if past else [])
    do = torch.randn(B, H, T, D, generator=g, dtype=F64)
    want = torch.autograd.grad(attention(q, k, v, cut=mode, backend="reference", attn_mask=keep, **past),
                               tensors, do)
    monkeypatch.setattr(kernels, "_aten", _efficient_stand_in())
    monkeypatch.setattr(kernels, "choose_kernel", lambda *a, **kw: ("efficient", ""))
    got = torch.autograd.grad(attention(q, k, v, cut=mode, backend="fused", attn_mask=keep, **past), tensors, do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["vanilla", "myopic", "myopic_kv"])
def test_unequal_value_head_size_fused_matches_reference(mode, masked):
    """DeepSeek-style heads (query/key 24, value 8) through the CPU kernel, forward and backward."""
    B, H, HKV, T = 2, 4, 2, 9
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, 24, generator=g, dtype=F64).requires_grad_()
    k = torch.randn(B, HKV, T, 24, generator=g, dtype=F64).requires_grad_()
    v = torch.randn(B, HKV, T, 8, generator=g, dtype=F64).requires_grad_()
    kp, vp = (t.detach().clone().requires_grad_() for t in (k, v))
    mask = torch.ones(T, T, dtype=torch.bool).tril() if masked else None
    past = dict(k_past=kp, v_past=vp) if mode == "myopic" else {}
    tensors = [q, k, v] + ([kp, vp] if past else [])
    do = torch.randn(B, H, T, 8, generator=g, dtype=F64)
    results = {}
    for backend in ("fused", "reference"):
        out = attention(q, k, v, cut=mode, backend=backend, attn_mask=mask, scale=1 / math.sqrt(24), **past)
        results[backend] = (out, *torch.autograd.grad(out, tensors, do))
    for a, b in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("error,falls_back", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("a bug"), False),
    (NotImplementedError("Could not run 'aten::_scaled_dot_product_flash_attention_for_cpu_backward'"), True),
    (RuntimeError("Unknown keyword argument 'scale' for operator 'aten::x'"), True),
    (TypeError("f() got an unexpected keyword argument 'scale'"), True),
])
def test_eager_fallback_catches_only_an_unavailable_kernel(monkeypatch, error, falls_back, cpu_backward):
    if cpu_backward == "grouped":
        pytest.skip("the grouped backward does not call the private flash backward")
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(kernels, "_fused_backward", failing)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    out = attention(q, k, v, cut="myopic_kv", backend="fused")
    if not falls_back:
        with pytest.raises(type(error)):
            torch.autograd.grad(out.sum(), (q, k, v))
        return
    with pytest.warns(RuntimeWarning, match="recomputing it eagerly"):
        got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = attention(q, k, v, cut="myopic_kv", backend="reference")
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

