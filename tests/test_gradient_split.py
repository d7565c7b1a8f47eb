"""The gradient split (vanilla gradient = myopic part + future part) and the training-loop monitor
that measures it: values against plain backward passes, and no side effects on training."""

import json

import pytest
import torch
import torch.nn.functional as F

from myopia import GPT, GPTConfig
from myopia.attention import Cut
from myopia.analysis.gradients import (
    body_parameters,
    gradient_split,
    log_spaced_steps,
    split_monitor,
)
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.loop import train_arm


class TokenTask:
    """Random tokens, next-token loss: enough of the Task protocol for gradient_split."""

    seq_len = 8

    def __init__(self, vocab=23, seq_len=8):
        self.vocab, self.seq_len = vocab, seq_len

    def heldout_batch(self, index, batch_size):
        g = torch.Generator().manual_seed(100 + index)
        x = torch.randint(0, self.vocab, (batch_size, self.seq_len + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    def loss_per_position(self, logits, y):
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")


def _gpt(mode="vanilla", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=16, block_size=8, attention=mode,
                         dropout=dropout)).double()


def _backward_grads(model, task, mode, n_batches=2, batch_size=4):
    model.set_attention(mode)
    model.zero_grad()
    for i in range(n_batches):
        x, y = task.heldout_batch(i, batch_size)
        (task.loss_per_position(model(x), y).mean() / n_batches).backward()
    return {n: p.grad.clone() for n, p in body_parameters(model)}


@pytest.mark.parametrize("n_batches", [2, 1])
def test_split_matches_backward_passes_in_both_modes(n_batches):
    task = TokenTask()
    model = _gpt("myopic_kv")
    split = gradient_split(model, task, n_batches=n_batches, batch_size=4, device=torch.device("cpu"))
    total = _backward_grads(_gpt(), task, "vanilla", n_batches)
    myopic = _backward_grads(_gpt(), task, "myopic", n_batches)
    sq = lambda d: sum(float(v.double().square().sum()) for v in d.values())  # noqa: E731
    future = {n: total[n] - myopic[n] for n in total}
    assert split["total_norm"] == pytest.approx(sq(total) ** 0.5, rel=1e-5)
    assert split["myopic_norm"] == pytest.approx(sq(myopic) ** 0.5, rel=1e-5)
    assert split["future_norm"] == pytest.approx(sq(future) ** 0.5, rel=1e-5)
    dot = sum(float((myopic[n] * future[n]).sum()) for n in total)
    assert split["cos_myopic_future"] == pytest.approx(dot / (sq(myopic) * sq(future)) ** 0.5, rel=1e-4)
    assert split["future_norm"] > 0.01 * split["total_norm"]  # the off-diagonal terms are there
    assert set(split["layers"]) == {"0", "1"}
    layer_sq = sum(v["total_norm"] ** 2 for v in split["layers"].values())
    assert layer_sq <= split["total_norm"] ** 2 * (1 + 1e-9)  # layers are a subset (ln_f is in no layer)
    assert model.attention_cut() == Cut("myopic_kv")  # restored


@pytest.mark.parametrize("groups", [2, 3, 100])
def test_split_in_groups_equals_the_whole(groups):
    """Measured in groups of layers (each with the others frozen), the split is the same as in one
    go, and it leaves the model as it found it."""
    from myopia.analysis.gradients import _parameter_groups

    task = TokenTask()
    named = body_parameters(_gpt())
    parts = _parameter_groups(named, groups)
    assert [n for part in parts for n, _ in part] == [n for n, _ in named]  # a partition, in order
    assert all(parts) and (len(parts) == groups if groups < len(named) else len(parts) <= len(named))
    whole = gradient_split(_gpt(), task, n_batches=2, batch_size=4, device=torch.device("cpu"))
    model = _gpt("myopic")
    split = gradient_split(model, task, n_batches=2, batch_size=4, device=torch.device("cpu"), groups=groups)
    for key in ("total_norm", "myopic_norm", "future_norm", "cos_myopic_future", "future_share"):
        assert split[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15)
        for layer in whole["layers"]:
            assert split["layers"][layer][key] == pytest.approx(whole["layers"][layer][key], rel=1e-12, abs=1e-15)
    assert all(p.requires_grad for p in model.parameters()) and model.attention_cut() == Cut("myopic")
    with pytest.raises(ValueError, match="groups=0"):
        gradient_split(model, task, n_batches=1, batch_size=4, device=torch.device("cpu"), groups=0)


def test_one_token_sequences_have_no_future_part():
    task = TokenTask(seq_len=1)
    split = gradient_split(_gpt(), task, n_batches=2, batch_size=6, device=torch.device("cpu"))
    assert split["total_norm"] > 0
    assert split["future_norm"] == pytest.approx(0.0, abs=1e-12 * split["total_norm"])
    assert split["future_share"] == pytest.approx(0.0, abs=1e-20)


def test_split_leaves_grads_mode_and_training_flag_alone():
    model = _gpt("myopic")
    model.set_attention("myopic@0.25")
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    gradient_split(model, TokenTask(), n_batches=1, batch_size=2, device=torch.device("cpu"))
    assert model.training and model.attention_cut() == Cut("myopic", beta=0.25)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    # the embeddings and head, frozen for the two passes (no gradient is made for them), are trainable again
    assert all(p.requires_grad for p in model.parameters())


def test_embeddings_and_head_are_left_out():
    names = {n for n, _ in body_parameters(_gpt())}
    assert not any(n.startswith(("wte", "wpe", "head")) for n in names)
    assert "blocks.0.attn.c_attn.weight" in names


def test_log_spaced_steps():
    assert [s for s in range(20) if log_spaced_steps(s, every=10)] == [0, 1, 2, 4, 8, 10, 16]
    assert [s for s in range(10) if log_spaced_steps(s, every=0)] == [0, 1, 2, 4, 8]


def test_monitor_does_not_change_training(tmp_path):
    """The monitor runs between optimiser steps; with dropout on (so that any RNG use would show),
    the run's losses and final weights equal an unmonitored run's, bit for bit."""
    task = SyntheticTask(SyntheticConfig(seq_len=8, window=3), seed=0)
    common = dict(optim_cfg=OptimConfig(lr=3e-3), cfg=TrainConfig(steps=9, batch_size=8, eval_every=0,
                                                                  checkpoint_every=0, log_every=1, progress=False))

    def model():
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, input_dim=2, output_dim=1,
                             dropout=0.2, attention="myopic"))

    plain = model()
    a = train_arm(plain, task, arm_dir=str(tmp_path / "a"), arm="a", **common)
    watched = model()
    monitor = split_monitor(task, n_batches=1, batch_size=4, precision="auto", every=0, final_step=9)
    b = train_arm(watched, task, arm_dir=str(tmp_path / "b"), arm="b", monitor=monitor, **common)
    assert [r["loss"] for r in a.history if "loss" in r] == [r["loss"] for r in b.history if "loss" in r]
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    measured = [r["step"] for r in records if "gradient_split" in r]
    assert measured == [0, 1, 2, 4, 8, 9]
    assert all(r["gradient_split"]["future_norm"] > 0 for r in records if "gradient_split" in r)


@pytest.mark.parametrize("preset,groups", [("pythia-14m", 1), ("llama-tiny", 1), ("llama-tiny", 2)])
def test_split_of_a_hugging_face_model(preset, groups):
    pytest.importorskip("transformers")
    from myopia.models.hf.presets import build_hf_model

    task = TokenTask(vocab=64)
    model = build_hf_model(preset, "myopic", vocab_size=64, seed=0)
    split = gradient_split(model, task, n_batches=1, batch_size=3, device=torch.device("cpu"), precision="fp32",
                           groups=groups)
    assert model.attention_cut() == Cut("myopic")
    names = {n for n, _ in body_parameters(model)}
    assert not any("embed" in n or "lm_head" in n for n in names)
    grads = {}
    for mode in ("vanilla", "myopic"):
        model.set_attention(mode)
        x, y = task.heldout_batch(0, 3)
        model.eval()
        g = torch.autograd.grad(task.loss_per_position(model(x), y).mean(), [p for _, p in body_parameters(model)])
        grads[mode] = torch.cat([v.flatten() for v in g]).double()
    future = grads["vanilla"] - grads["myopic"]
    assert split["total_norm"] == pytest.approx(float(grads["vanilla"].norm()), rel=1e-4)
    assert split["future_norm"] == pytest.approx(float(future.norm()), rel=1e-3)
    assert split["future_norm"] > 0 and len(split["layers"]) == model.config.num_hidden_layers


def test_monitor_factory_skips_what_cannot_be_split(monkeypatch):
    from myopia.runs.arms import Arm
    from myopia.runs.gradient_geometry import monitor_factory

    task = TokenTask()
    make = lambda parallel="ddp": monitor_factory(task, 1, TrainConfig(steps=5, batch_size=2, eval_every=0,  # noqa: E731
                                                                       parallel=parallel))
    for_arm = make()
    assert for_arm(Arm("vanilla", Cut()), _gpt()) is not None
    assert for_arm(Arm("myopic@0.5", Cut("myopic", beta=0.5)), _gpt()) is not None
    assert for_arm(Arm("bigram", Cut("bigram")), _gpt()) is None  # its forward is not vanilla's
    assert monitor_factory(task, 0, TrainConfig(steps=5, batch_size=2)) is None  # off
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert make("fsdp") is None  # the bare model holds shards
    assert make("ddp") is not None
