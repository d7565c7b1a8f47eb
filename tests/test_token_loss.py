"""The chunked head + cross-entropy (myopia.models.token_loss) against the plain
``F.cross_entropy(F.linear(h, W))``: losses and both gradients, in float64 to 1e-12 and in float32 to
its rounding, for a mean, a sum, a masked and an arbitrary weighting of the rows, with rows split over
several chunks; no tensor of the logits' size exists at once; and every model's ``model(x, targets=y)``
(our GPT, each Hugging Face family whose head is fused) equals the loss of its own logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from myopia.models.token_loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy

N, D, V = 37, 12, 53


def _inputs(dtype, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        y[i] = IGNORE_INDEX
    return h, w, y


REDUCTIONS = {
    "mean": lambda losses, y: losses.mean(),
    "sum": lambda losses, y: losses.sum(),
    "masked mean": lambda losses, y: torch.where(y != IGNORE_INDEX, losses, 0.0).sum() / (y != IGNORE_INDEX).sum(),
    "weighted": lambda losses, y: (losses * torch.linspace(0.1, 2.0, len(losses), dtype=losses.dtype)).sum(),
    "some rows": lambda losses, y: losses[3:11].mean(),
}


def _plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float() if h.dtype != torch.float64 else F.linear(h, w), y,
                           reduction="none", ignore_index=IGNORE_INDEX)


def _grads(fn, reduce, h, w, y):
    losses = fn(h, w, y)
    gh, gw = torch.autograd.grad(reduce(losses.to(h.dtype) if h.dtype == torch.float64 else losses, y), [h, w])
    return losses.detach(), gh, gw


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
@pytest.mark.parametrize("ignore", [(), (0, 5, 36)])
def test_float64_equals_the_plain_loss_and_gradients(reduction, ignore):
    h, w, y = _inputs(torch.float64, ignore=ignore)
    ref = _grads(_plain, REDUCTIONS[reduction], h, w, y)
    got = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, rows=8), REDUCTIONS[reduction], h, w, y)
    for r, g in zip(ref, got):
        assert torch.allclose(g.double(), r.double(), rtol=1e-12, atol=1e-12)
    other = "weighted" if reduction != "weighted" else "mean"
    assert float((ref[2] - _grads(_plain, REDUCTIONS[other], h, w, y)[2]).abs().max()) > 1e-3  # the check can fail


def test_float32_agrees_to_its_rounding():
    h, w, y = _inputs(torch.float32, seed=1)
    ref = _grads(_plain, REDUCTIONS["mean"], h, w, y)
    got = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, rows=8), REDUCTIONS["mean"], h, w, y)
    assert got[0].dtype == torch.float32
    for r, g in zip(ref, got):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_plain_autocast_loss():
    """Under autocast the head's matmul runs in bfloat16 as the plain path's would; the losses stay float32."""
    h, w, y = _inputs(torch.float32, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
        fused = linear_cross_entropy(h, w, y, rows=8)
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)  # the same bfloat16 logits, float32 softmax
    gf = torch.autograd.grad(fused.mean(), [h, w])
    gp = torch.autograd.grad(plain.mean(), [h, w])
    for a, b in zip(gf, gp):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-3 * float(b.abs().max()))


def test_a_retained_graph_gives_the_same_gradient_twice():
    h, w, y = _inputs(torch.float64, seed=3)
    loss = linear_cross_entropy(h, w, y, rows=8).mean()
    first = torch.autograd.grad(loss, [h, w], retain_graph=True)
    second = torch.autograd.grad(loss, [h, w])
    for a, b in zip(first, second):  # the second recomputes the head's gradient (the first scaled it in place)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_without_gradients_the_losses_are_the_same():
    h, w, y = _inputs(torch.float64, seed=4, ignore=(2,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, y, rows=5), _plain(h, w, y), rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_holds_the_logits_of_every_row():
    """The point of the chunked loss: the largest tensor of the forward and backward is one chunk's
    logits (or the head's gradient), never N × V; the plain loss's is N × V."""
    n, v, d = 1024, 65536, 4
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    y = torch.randint(0, v, (n,))
    rows = chunk_rows(v, n)
    assert rows < n
    with _LargestTensor() as seen:
        linear_cross_entropy(h, w, y, rows=rows).mean().backward()
    assert seen.largest <= max(rows * v, v * d) < n * v
    with _LargestTensor() as plain:
        _plain(h, w, y).mean().backward()
    assert plain.largest >= n * v


def test_chunk_rows_bounds_the_chunk():
    assert chunk_rows(49152, 10_000) == 320  # SmolLM2: 320 rows, 63 MB of float32 logits
    assert chunk_rows(49152, 100) == 100
    assert chunk_rows(10**7, 10_000) == 256  # never fewer than 256 rows


def test_gpt_targets_give_the_loss_of_its_logits():
    from myopia import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=16, block_size=8, attention="myopic")).double()
    x = torch.randint(0, 61, (3, 8))
    y = torch.randint(0, 61, (3, 8))
    y[0, :2] = IGNORE_INDEX
    losses = model(x, targets=y)
    plain = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none", ignore_index=IGNORE_INDEX)
    assert losses.shape == (3, 8)
    assert torch.allclose(losses.double(), plain, rtol=1e-12, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(losses.double().mean(), params)
    g2 = torch.autograd.grad(plain.mean(), params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"])
def test_every_fused_family_gives_the_loss_of_its_own_logits(family):
    pytest.importorskip("transformers")
    from test_families import _config

    from myopia.models.hf.myopic import make_myopic
    from myopia.models.hf.presets import FUSED_HEAD_FAMILIES, HFCausalLM

    assert family in FUSED_HEAD_FAMILIES
    config, cls = _config(family)
    torch.manual_seed(0)
    hf = cls(config).double()
    make_myopic(hf, "myopic")
    model = HFCausalLM(hf, family)
    assert model.fused_head() is not None
    x = torch.randint(0, config.vocab_size, (2, 7))
    y = torch.randint(0, config.vocab_size, (2, 7))
    losses, hidden = model(x, targets=y, return_hidden_states=True)
    logits, hidden_plain = model(x, return_hidden_states=True)
    plain = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    assert torch.allclose(losses.double(), plain, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(hidden, hidden_plain))
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(losses.double().mean(), params, allow_unused=True)
    g2 = torch.autograd.grad(plain.mean(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_soft_capped_head_takes_the_logits_path():
    """Gemma-2 caps its final logits: its head cannot move into the loss, so targets go through the logits."""
    pytest.importorskip("transformers")
    from test_families import _config

    from myopia.models.hf.presets import HFCausalLM

    config, cls = _config("gemma2")
    config.final_logit_softcapping = 3.0
    torch.manual_seed(0)
    model = HFCausalLM(cls(config).double(), "gemma2")
    assert model.fused_head() is None
    x = torch.randint(0, config.vocab_size, (2, 7))
    y = torch.randint(0, config.vocab_size, (2, 7))
    plain = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
    assert torch.allclose(model(x, targets=y).double(), plain, rtol=1e-12, atol=1e-12)
