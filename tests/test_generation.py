"""Greedy generation: the KV-cached path gives the full forward's logits and the same tokens."""

import pytest
import torch

from myopia.models.generate import GenerationError, forward_cached, generate_greedy
from myopia.models.gpt import GPT, GPTConfig

SHAPES = {
    "learned": dict(n_layer=2, n_head=2, n_embd=16),
    "rotary-gqa": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=16, position="rotary", bias=False),
}


def _model(shape, attention="vanilla", seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=11, block_size=24, attention=attention, init_std=0.3, **SHAPES[shape])).double()
    return m.eval()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_logits_equal_the_full_forward(shape):
    model = _model(shape)
    seq = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    full = model(seq)
    cache: list = []
    got = [forward_cached(model, seq[:, :7], cache)]  # a prompt, then one token at a time
    got += [forward_cached(model, seq[:, t:t + 1], cache) for t in range(7, 20)]
    got = torch.cat(got, dim=1)
    assert torch.allclose(got, full, rtol=0, atol=1e-10)
    assert cache[0][0].shape[2] == 20


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_and_uncached_greedy_generation_agree(shape):
    model = _model(shape)
    prompt = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(2))
    cached = generate_greedy(model, prompt, 12, cache=True)
    plain = generate_greedy(model, prompt, 12, cache=False)
    assert cached.shape == (5, 12)
    assert torch.equal(cached, plain)
    assert len(set(cached.flatten().tolist())) > 2  # a non-degenerate continuation
    # Each new token is the argmax of the full forward on everything before it.
    seq = torch.cat([prompt, cached], dim=1)
    assert torch.equal(model(seq[:, :-1])[:, 5:].argmax(-1), cached)


def test_a_myopic_model_generates_like_the_vanilla_one():
    vanilla, myopic = _model("learned"), _model("learned", "myopic:h=1")
    prompt = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate_greedy(vanilla, prompt, 8), generate_greedy(myopic, prompt, 8))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hook_points_fire_and_patch_alike_with_and_without_the_cache(shape):
    model = _model(shape)
    seq = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(5))
    attn = model.blocks[1].attn
    seen: dict = {"q": [], "k": [], "v": []}
    handles = [getattr(attn, f"hook_{n}").register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(out))
               for n in seen]
    model(seq)
    full = {n: seen[n].pop() for n in seen}
    cache: list = []
    forward_cached(model, seq[:, :5], cache)  # the prompt, then one position at a time
    for t in range(5, 9):
        forward_cached(model, seq[:, t:t + 1], cache)
    for handle in handles:
        handle.remove()
    for n in seen:  # the hooks saw each position once, with the values of the full forward (post-rotary)
        assert [o.shape[2] for o in seen[n]] == [5, 1, 1, 1, 1]
        assert torch.allclose(torch.cat(seen[n], dim=2), full[n], rtol=0, atol=1e-12)

    prompt = seq[:, :5]
    plain = generate_greedy(model, prompt, 6, cache=False)

    def zero_head0(mod, inp, out):
        out = out.clone()
        out[:, 0] = 0
        return out

    handles = [block.attn.hook_v.register_forward_hook(zero_head0) for block in model.blocks]
    patched_plain = generate_greedy(model, prompt, 6, cache=False)
    patched_cached = generate_greedy(model, prompt, 6)
    for handle in handles:
        handle.remove()
    assert not torch.equal(patched_plain, plain)  # the patch changes the answer
    assert torch.equal(patched_cached, patched_plain)


def test_bad_requests_are_one_line_errors():
    model = _model("learned")
    prompt = torch.zeros(2, 20, dtype=torch.long)
    with pytest.raises(GenerationError, match="block_size is 24"):
        generate_greedy(model, prompt, 6)
    with pytest.raises(GenerationError, match="cache=False"):
        generate_greedy(_model("learned", "bigram"), prompt[:, :3], 2)
    assert generate_greedy(_model("learned", "bigram"), prompt[:, :3], 2, cache=False).shape == (2, 2)


@pytest.mark.gpu
def test_cached_generation_on_cuda():
    model = _model("rotary-gqa").cuda()
    prompt = torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(4)).cuda()
    assert torch.equal(generate_greedy(model, prompt, 12), generate_greedy(model, prompt, 12, cache=False))
