"""The training loop's loss mask: tasks with ``loss_mask`` train and are scored on the masked tokens only
(sum over masked tokens / their number); tasks without one keep the plain mean."""

import json
import os

import torch
import torch.nn.functional as F

from myopia.attention import Cut
from myopia.models.gpt import GPTConfig
from myopia.runs.arms import Arm, build_model
from myopia.tasks.base import IGNORE, HELDOUT_STREAM, TRAIN_STREAM, batch_generator, mean_loss
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.loop import evaluate, train_arm

VOCAB, T = 7, 6


class MaskedTokens:
    """Random tokens; only positions in ``keep`` carry loss (the others' targets are IGNORE)."""

    name, seq_len = "masked", T

    def __init__(self, keep):
        self.keep = list(keep)

    def model_overrides(self):
        return {"vocab_size": VOCAB, "block_size": T}

    def _batch(self, gen, batch_size):
        x = torch.randint(0, VOCAB, (batch_size, T), generator=gen)
        y = torch.randint(0, VOCAB, (batch_size, T), generator=gen)
        drop = torch.ones(T, dtype=torch.bool)
        drop[self.keep] = False
        return x, torch.where(drop, IGNORE, y)

    def train_batch(self, step, micro, batch_size):
        return self._batch(batch_generator(0, TRAIN_STREAM, step, micro), batch_size)

    def heldout_batch(self, index, batch_size):
        return self._batch(batch_generator(0, HELDOUT_STREAM, index), batch_size)

    def loss_per_position(self, pred, y):
        return F.cross_entropy(pred.float().transpose(1, 2), y, ignore_index=IGNORE, reduction="none")

    def loss_mask(self, y):
        return y != IGNORE


def _model(task, seed=0):
    return build_model(GPTConfig(n_layer=1, n_head=2, n_embd=16), Arm("vanilla", Cut("vanilla")),
                       task.model_overrides(), seed)


def test_mean_loss_averages_over_masked_tokens_only():
    task = MaskedTokens(keep=[2, 5])
    x, y = task.train_batch(0, 0, 4)
    pred = _model(task)(x)
    full = F.cross_entropy(pred.transpose(1, 2), torch.where(y == IGNORE, 0, y), reduction="none")
    expected = full[:, [2, 5]].mean()  # 8 answer tokens, not 24 positions
    assert torch.allclose(mean_loss(task, pred, y), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(mean_loss(task, pred, y), full.mean(), rtol=1e-3)


def test_unmasked_task_keeps_the_plain_mean_bit_for_bit():
    task = SyntheticTask(SyntheticConfig(seq_len=8, window=2), seed=0)
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=16), Arm("vanilla", Cut("vanilla")),
                        task.model_overrides(), 0)
    x, y = task.train_batch(0, 0, 4)
    pred = model(x)
    assert torch.equal(mean_loss(task, pred, y), task.loss_per_position(pred, y).mean())
    ev = evaluate(model, task, 2, 4, torch.device("cpu"), precision="fp32")
    per = torch.stack([task.loss_per_position(model(task.heldout_batch(i, 4)[0]), task.heldout_batch(i, 4)[1])
                       .double().sum(0) for i in range(2)]).sum(0) / 8
    assert ev["per_position"] == per.tolist()


def _first_step(task, tmp_path, name):
    model = _model(task)
    result = train_arm(model, task, OptimConfig(lr=1e-2, warmup=0.0, grad_clip=0.0),
                       TrainConfig(steps=1, batch_size=4, log_every=1, eval_batches=2, progress=False,
                                   device="cpu", precision="fp32"), os.path.join(tmp_path, name), "vanilla")
    with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
        loss = next(json.loads(ln)["loss"] for ln in f if '"loss"' in ln)
    return model, loss, result


def test_loop_trains_and_scores_on_the_mask_only(tmp_path):
    task = MaskedTokens(keep=[3])
    before = _model(task)
    x, y = task.train_batch(0, 0, 4)
    expected = F.cross_entropy(before(x)[:, 3], y[:, 3]).item()
    _, loss, result = _first_step(task, tmp_path, "a")
    assert abs(loss - expected) < 1e-5  # the answer's loss, not diluted by the 5 unmasked positions
    ev = result.eval["per_position"]
    assert ev[3] is not None and all(v is None for i, v in enumerate(ev) if i != 3)  # None: nothing scored
    assert abs(result.eval["loss"] - ev[3]) < 1e-12
