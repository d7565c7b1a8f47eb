"""Answer tasks: formats, the loss mask's alignment, the scorer, and one-line errors."""

import pytest
import torch

from myopia.analysis.answers import (
    heldout_prompts,
    predict,
    prompt_keys,
    score,
    tally,
    training_prompt_keys,
    wilson,
)
from myopia.models.gpt import GPT, GPTConfig
from myopia.tasks.answer import (
    MultiplyConfig,
    MultiplyTask,
    ParityConfig,
    ParityTask,
    PathStarConfig,
    PathStarTask,
)
from myopia.tasks.base import IGNORE, mean_loss
from myopia.train.config import OptimConfig, TrainConfig
from myopia.train.loop import train_arm


def _text(task, ids):
    return "".join(task.vocab[int(i)] for i in ids)


def test_multiply_format_is_reversed_padded_and_correct():
    task = MultiplyTask(MultiplyConfig(min_digits=1, max_digits=3, x_pad=5, y_pad=4), seed=0)
    prompt, answer = task.sample(torch.Generator().manual_seed(0), 256)
    assert prompt.shape == (256, 5 + 4 + 2) and answer.shape == (256, 6)
    for p, a in zip(prompt.tolist(), answer.tolist()):
        s = _text(task, p)
        assert s[5] == "*" and s[-1] == "="
        x, y = int(s[:5][::-1]), int(s[6:10][::-1])
        assert s[3:5] == "00" and s[9] == "0"  # filler beyond max_digits is zero padding
        assert int(_text(task, a)[::-1]) == x * y
    # digit counts are uniform in [1, 3]: every count occurs
    x = [int(_text(task, p)[:5][::-1]) for p in prompt.tolist()]
    assert {len(str(v)) for v in x} == {1, 2, 3}


def test_a_known_product_and_the_mask_alignment():
    task = MultiplyTask(MultiplyConfig(min_digits=1, max_digits=2, x_pad=3, y_pad=3), seed=0)
    prompt = torch.tensor([task.encode(list("210*430="))])  # 12 * 34
    answer = torch.tensor([task.encode(list("8040"))])      # 408 reversed, 4 digits
    x, y = task.inputs_targets(prompt, answer)
    P, A = task.prompt_len, task.answer_len
    assert x.shape[1] == task.seq_len == P + A - 1
    assert _text(task, x[0]) == "210*430=804"
    assert (y[0, : P - 1] == IGNORE).all()
    assert y[0, P - 1:].tolist() == answer[0].tolist()  # the first answer token is the target at '='
    assert task.loss_mask(y).sum() == A


def test_parity_and_path_star_formats():
    par = ParityTask(ParityConfig(bits=7), seed=0)
    prompt, answer = par.sample(torch.Generator().manual_seed(0), 64)
    assert (prompt[:, -1] == par.MARKER).all() and torch.equal(answer[:, 0], prompt[:, :7].sum(1) % 2)
    _, y = par.inputs_targets(prompt, answer)
    assert par.loss_mask(y).sum(1).tolist() == [1] * 64 and torch.equal(y[:, -1], answer[:, 0])

    cfg = PathStarConfig(degree=3, length=4, nodes=20)
    task = PathStarTask(cfg, seed=0)
    prompt, answer = task.sample(torch.Generator().manual_seed(1), 32)
    assert prompt.shape == (32, 3 * 12 + 3) and answer.shape == (32, 4)
    for p, a in zip(prompt.tolist(), answer.tolist()):
        edges = [tuple(p[i: i + 2]) for i in range(0, 36, 3)]
        assert all(p[i + 2] == task.SEP for i in range(0, 36, 3))
        source, goal = p[36], p[37]
        assert p[38] == task.EQUALS and a[-1] == goal
        assert len({n for e in edges for n in e}) == 13
        path = [source, *a]
        assert all((u, v) in edges for u, v in zip(path, path[1:]))
    rev = PathStarTask(PathStarConfig(degree=3, length=4, nodes=20, mode="reverse"), seed=0)
    _, ra = rev.sample(torch.Generator().manual_seed(1), 32)
    assert torch.equal(ra, answer.flip(1))
    tl = PathStarTask(PathStarConfig(degree=3, length=4, nodes=20, mode="teacherless"), seed=0)
    x, y = tl.inputs_targets(prompt, answer)
    assert (x[:, 39:] == tl.DUMMY).all() and x[:, 38].eq(tl.EQUALS).all() and torch.equal(y[:, 38:], answer)


def test_batches_are_a_pure_function_of_seed_and_step():
    task = MultiplyTask(MultiplyConfig(), seed=3)
    a, b = task.train_batch(5, 1, 16), task.train_batch(5, 1, 16)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], task.train_batch(6, 1, 16)[0])
    assert not torch.equal(a[0], task.heldout_batch(5, 16)[0])
    assert torch.equal(task.heldout_examples(2, 8)[0], task.heldout_batch(2, 8)[0][:, : task.prompt_len])


def test_tally_scores_whole_answers_and_positions():
    answers = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    shifted = torch.tensor([[2, 3, 0], [5, 6, 0], [8, 9, 0]])  # off by one position
    assert tally(answers, answers) == {"n": 3, "exact": 3, "position_correct": [3, 3, 3]}
    assert tally(answers, shifted)["exact"] == 0 and tally(answers, shifted)["position_correct"] == [0, 0, 0]
    partial = answers.clone()
    partial[0, 2] = 0
    assert tally(answers, partial) == {"n": 3, "exact": 2, "position_correct": [3, 3, 2]}


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and abs(wilson(10, 10)[1] - 1.0) < 1e-12


def test_predictions_read_the_position_the_loss_trains():
    task = MultiplyTask(MultiplyConfig(min_digits=1, max_digits=2, x_pad=3, y_pad=3), seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(task.vocab), block_size=task.seq_len, n_layer=1, n_head=2, n_embd=16,
                          init_std=0.5))
    prompt, answer = task.heldout_examples(0, 32)
    x, y = task.heldout_batch(0, 32)
    out = predict(model, task, prompt, answer)
    logits = model(x)
    P = task.prompt_len
    # The first generated token is the argmax where the first answer token's loss is taken.
    assert torch.equal(out["generated"][:, 0], logits[:, P - 1].argmax(-1))
    assert torch.equal(out["teacher_forced"], logits[:, P - 1:].argmax(-1))
    first = torch.nn.functional.cross_entropy(logits[:, P - 1], answer[:, 0])
    assert torch.allclose(task.loss_per_position(logits, y)[:, P - 1].mean(), first)
    assert torch.allclose(mean_loss(task, logits, y), task.loss_per_position(logits, y)[:, P - 1:].mean())
    s = score(model, task, 40, 16, torch.device("cpu"))  # 16 + 16 + 8 examples
    assert s["generated"]["n"] == 40 and len(s["generated"]["position_accuracy"]) == task.answer_len


def test_prompt_keys_tell_equal_prompts_from_distinct_ones():
    task = MultiplyTask(MultiplyConfig(min_digits=3, max_digits=3), seed=0)
    prompt, _ = task.heldout_examples(0, 500)
    keys = prompt_keys(prompt)
    distinct = len({tuple(r) for r in prompt.tolist()})
    assert torch.unique(keys).numel() == distinct > 400
    assert torch.equal(prompt_keys(prompt.flip(0)), keys.flip(0))
    assert not torch.equal(prompt_keys(prompt.flip(1)), keys)  # the order of tokens counts


def test_training_prompt_keys_are_the_prompts_the_loop_trains_on(tmp_path):
    task = MultiplyTask(MultiplyConfig(min_digits=3, max_digits=3), seed=0)
    drawn = []
    original = task.train_batch

    def recording(step, micro, batch_size):
        x, y = original(step, micro, batch_size)
        drawn.append(x[:, : task.prompt_len])
        return x, y

    task.train_batch = recording
    model = GPT(GPTConfig(vocab_size=len(task.vocab), block_size=task.seq_len, n_layer=1, n_head=2, n_embd=16))
    train_arm(model, task, OptimConfig(lr=1e-3), TrainConfig(steps=3, batch_size=8, grad_accum=2, eval_batches=1,
                                                             progress=False, device="cpu"), str(tmp_path), "vanilla")
    task.train_batch = original
    assert len(drawn) == 6  # 3 steps x 2 micro-batches
    seen = training_prompt_keys(task, steps=3, batch_size=8, grad_accum=2)
    assert torch.equal(seen, torch.unique(prompt_keys(torch.cat(drawn))))
    assert not torch.isin(prompt_keys(task.train_batch(3, 0, 8)[0][:, : task.prompt_len]), seen).any()


def test_score_splits_off_the_heldout_prompts_training_drew():
    task = MultiplyTask(MultiplyConfig(min_digits=2, max_digits=2), seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(task.vocab), block_size=task.seq_len, n_layer=1, n_head=2, n_embd=16,
                          init_std=0.5))
    prompt, answer = task.heldout_examples(0, 40)
    seen = prompt_keys(prompt[:10])  # pretend training drew the first ten
    drew = torch.isin(prompt_keys(prompt), seen)  # the first ten, and any repeat of them
    s = score(model, task, 40, 40, torch.device("cpu"), seen=seen)
    assert s["seen_in_training"] == int(drew.sum()) >= 10
    pred = predict(model, task, prompt, answer)
    for kind in ("generated", "teacher_forced"):
        assert s[kind]["unseen"]["counts"] == tally(answer[~drew], pred[kind][~drew])
    everything = score(model, task, 40, 40, torch.device("cpu"), seen=prompt_keys(prompt))
    assert everything["seen_in_training"] == 40 and everything["generated"]["unseen"] is None
    assert "seen_in_training" not in score(model, task, 40, 40, torch.device("cpu"))


def test_exclude_keeps_the_heldout_prompts_out_of_training():
    cfg = MultiplyConfig(min_digits=1, max_digits=1)  # 100 prompts: training keeps drawing held-out ones
    plain, task = MultiplyTask(cfg, seed=0), MultiplyTask(cfg, seed=0)
    held = heldout_prompts(task, 30, 16)  # the prompts score(task, 30, 16) answers
    assert torch.equal(held, torch.cat([task.heldout_examples(0, 16)[0], task.heldout_examples(1, 16)[0][:14]]))
    task.exclude(held)
    keys, p, hits = prompt_keys(held), task.prompt_len, 0
    for step in range(20):
        x0, y0 = plain.train_batch(step, 0, 32)
        x, y = task.train_batch(step, 0, 32)
        hit = torch.isin(prompt_keys(x0[:, :p]), keys)
        hits += int(hit.sum())
        assert not torch.isin(prompt_keys(x[:, :p]), keys).any()
        assert torch.equal(x[~hit], x0[~hit]) and torch.equal(y[~hit], y0[~hit])  # the other rows as drawn
        again = task.train_batch(step, 0, 32)  # the same (seed, step) gives the same batch
        assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert hits > 50  # without the exclusion, training draws them
    assert not torch.isin(training_prompt_keys(task, 20, 32), keys).any()
    assert torch.isin(training_prompt_keys(plain, 20, 32), keys).any()


def test_exclude_refuses_a_heldout_set_that_leaves_nothing_to_draw():
    task = MultiplyTask(MultiplyConfig(min_digits=1, max_digits=1), seed=0)
    task.exclude(heldout_prompts(task, 5000, 500))  # every one of the 100 prompts
    with pytest.raises(ValueError, match="widen the task, or turn --exclude_heldout off"):
        task.train_batch(0, 0, 8)


@pytest.mark.parametrize("make, match", [
    (lambda: MultiplyConfig(max_digits=4, x_pad=3, y_pad=5), "multiply.x_pad"),
    (lambda: MultiplyConfig(min_digits=3, max_digits=2, x_pad=3, y_pad=3), "min_digits"),
    (lambda: PathStarConfig(degree=5, length=10, nodes=50), "path_star.nodes 51"),
    (lambda: PathStarConfig(length=0), "answer is empty"),
    (lambda: PathStarConfig(mode="sideways"), "standard, reverse, teacherless"),
    (lambda: ParityConfig(bits=0), "parity.bits"),
])
def test_bad_task_settings_name_the_option_and_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pad_zero_means_no_filler():
    task = MultiplyTask(MultiplyConfig(min_digits=2, max_digits=3), seed=0)
    assert (task.x_pad, task.y_pad, task.prompt_len, task.answer_len) == (3, 3, 8, 6)
    prompt, _ = task.sample(torch.Generator().manual_seed(0), 4)
    assert (prompt[:, 3] == task.STAR).all() and (prompt[:, 7] == task.EQUALS).all()


def test_heldout_operands_can_have_their_own_digit_range():
    """The paper trains on 1-5 digit operands and scores 5x5: eval_min_digits applies to held-out draws only."""
    task = MultiplyTask(MultiplyConfig(min_digits=1, max_digits=3, eval_min_digits=3), seed=0)
    prompt, _ = task.heldout_examples(0, 256)
    held = {len(str(int(_text(task, p)[:3][::-1]))) for p in prompt.tolist()}
    x, _ = task.train_batch(0, 0, 256)
    trained = {len(str(int(_text(task, p)[:3][::-1]))) for p in x.tolist()}
    assert held == {3} and trained == {1, 2, 3}
    assert torch.equal(task.heldout_batch(0, 256)[0][:, : task.prompt_len], prompt)
    with pytest.raises(ValueError, match="eval_min_digits=4 is outside"):
        MultiplyConfig(min_digits=1, max_digits=3, eval_min_digits=4)
