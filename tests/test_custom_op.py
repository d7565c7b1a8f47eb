"""The fused myopic op as a torch.library custom op: opcheck, torch.compile without graph breaks,
and the Triton diagonal kernel (CPU interpreter) against the PyTorch formulas."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from definition import gradients, relative_error

from myopia import GPT, GPTConfig
from myopia.attention import attention, fused, triton_diag
from myopia.attention.reference import expand_kv


def _inputs(H=4, HKV=2, T=9, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, H, D, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()  # strided, as in models
    k = torch.randn(2, HKV, T, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, HKV, T, D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("past", [False, True])
@pytest.mark.parametrize("beta,horizon", [(0.0, 0), (0.3, 0), (0.0, 3)])
def test_opcheck(past, beta, horizon):
    q, k, v = _inputs()
    kp, vp = (k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()) if past else (None, None)
    torch.library.opcheck(torch.ops.myopia.myopic_attention.default, (q, k, v, kp, vp, None, 0.35, beta, horizon))


def test_opcheck_with_mask():
    q, k, v = _inputs(HKV=4)
    keep = torch.ones(9, 9, dtype=torch.bool).tril()
    keep[:, :2] = False
    keep[0, 0] = True
    mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    torch.library.opcheck(torch.ops.myopia.myopic_attention.default, (q, k, v, None, None, mask, 0.35, 0.0, 0))


@pytest.mark.parametrize("mode", ["myopic", "myopic_kv", "myopic:h=2:layers=1"])
def test_compiled_model_has_no_graph_break_and_same_gradient(mode):
    """fullgraph=True fails on any graph break; aot_eager runs the traced forward and backward."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=19, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=8, attention=mode,
                    position="rotary")
    model = GPT(cfg).double()
    x = torch.randint(0, 19, (2, 8))

    def loss(m):
        return m(x).logsumexp(-1).sum()

    eager = gradients(loss(model), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    traced = gradients(loss(compiled), list(model.parameters()))
    assert relative_error(traced, eager) < 1e-12


def _triton_vs_torch(q, k, v, v_dim_note=""):
    """The kernel's four outputs against the unfused PyTorch formulas, with and without full grads."""
    from myopia.attention import kernels

    groups = q.shape[1] // k.shape[1]
    k_e, v_e = expand_kv(k, groups), expand_kv(v, groups)
    q_c = q.contiguous()
    out, lse, extras = kernels.fused_forward(q_c, k_e, v_e, scale=0.3, mask=None)
    do = torch.randn_like(out)
    _, dk_full, dv_full = kernels.fused_backward(do, q_c, k_e, v_e, out, lse, extras, scale=0.3, mask=None)
    for beta, full in ((0.0, False), (0.25, True)):
        got = triton_diag.split_kv_grads(q, k, v, out, do, lse, dk_full if full else None,
                                         dv_full if full else None, scale=0.3, beta=beta,
                                         want_past_k=full, want_past_v=full)
        want = fused._split_kv_grads_torch(q_c, k_e, v_e, out, do, lse, dk_full, dv_full, scale=0.3, beta=beta,
                                           mask=None, horizon=0, groups=groups, need_cross=full,
                                           want_past_k=full, want_past_v=full)
        for a, b in zip(got, want):
            if b is None:
                assert a is None
            else:  # the kernel computes in float32
                assert a.shape == b.shape, (a.shape, b.shape, v_dim_note)
                assert (a - b).abs().max() / b.abs().max() < 1e-5, (tuple(q.shape), tuple(v.shape), beta)


def _check_triton_kernel() -> None:
    """Run by the test below in a process with TRITON_INTERPRET=1 (read when triton compiles)."""
    assert triton_diag.available(torch.empty(1, 1, 1, 8))
    for H, HKV, D, DV in ((4, 2, 16, 16), (2, 2, 24, 8), (3, 1, 8, 40)):
        q, k, v = (t.detach() for t in _inputs(H=H, HKV=HKV, T=37, D=D))
        v = torch.randn(*v.shape[:-1], DV, dtype=v.dtype)  # a value head size of its own
        _triton_vs_torch(q, k, v, f"DV={DV}")
    # int64 offsets: batch b=2 of a query tensor whose batch stride is 2**30 elements starts at element
    # 2**31, past int32. The buffer is 8 GB of address space; only the three touched rows are ever mapped.
    B, H, T, D = 3, 2, 5, 8
    g = torch.Generator().manual_seed(1)
    q_small = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    big = torch.empty(2 * 2**30 + H * T * D, dtype=torch.float32)
    q = big.as_strided((B, H, T, D), (2**30, T * D, D, 1))
    q.copy_(q_small)
    k, v = (torch.randn(B, 1, T, D, generator=g) for _ in range(2))
    _triton_vs_torch(q, k, v, "int64")
    print("triton kernel ok")


@pytest.mark.skipif(triton_diag.triton is None, reason="triton is not installed (CUDA machines have it)")
def test_triton_diagonal_kernel_matches_torch():
    """The Triton kernel through its CPU interpreter, against the unfused PyTorch formulas."""
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", "import test_custom_op as t; t._check_triton_kernel()"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "triton kernel ok" in run.stdout, run.stderr[-3000:]


def test_grad_mode_off_takes_plain_sdpa():
    q, k, v = _inputs()
    with torch.no_grad():
        out = attention(q, k, v, cut="myopic_kv")
    assert not out.requires_grad


@pytest.mark.parametrize("family", ["ours", "hf", "hf-llama"])
def test_myopic_backward_under_bf16_autocast(family):
    """bf16 autocast (the CUDA default) through the weight-only projection copy: a regression test for
    a dtype mismatch the first GPU run found. The gradient matches the float32 one to bf16 precision.
    A Llama's rotary hands attention float32 queries/keys beside bfloat16 values under autocast (the
    fused op then failed on CPU, where SmolLM2 fine-tunes in bf16)."""
    torch.manual_seed(0)
    if family == "ours":
        model = GPT(GPTConfig(vocab_size=31, n_layer=2, n_head=2, n_embd=32, block_size=16, attention="myopic"))
        call = model
    else:
        transformers = pytest.importorskip("transformers")
        from myopia.models.hf.myopic import make_myopic

        if family == "hf":
            cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
            model = transformers.LlamaForCausalLM(cfg)
        model = make_myopic(model, "myopic")
        call = lambda x: model(input_ids=x, use_cache=False).logits
    x = torch.randint(0, 31, (2, 16))
    full = gradients(call(x).float().logsumexp(-1).sum(), list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = call(x).float().logsumexp(-1).sum()
    low = gradients(loss, list(model.parameters()))
    assert all(g.dtype == torch.float32 for g in low)
    assert relative_error(low, full) < 5e-2
