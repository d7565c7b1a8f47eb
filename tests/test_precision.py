"""train.precision auto (issue 40): bf16 autocast where the CPU has bf16 matrix units, float32
elsewhere (both paths tested on any machine through MYOPIA_NATIVE_BF16), recorded in results; and
under bf16 autocast every arm's forward is the same to the bit, vanilla included (the first step's
equality that first_step_check reports), for our GPT and a Hugging Face model."""

import json

import pytest
import torch

from myopia.train import precision


@pytest.mark.parametrize("native,expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, native, expected):
    monkeypatch.setenv("MYOPIA_NATIVE_BF16", native)
    cpu = torch.device("cpu")
    assert precision.resolve_precision(cpu, "auto") == expected
    assert precision.resolve_precision(cpu, "fp32") == "fp32" and precision.resolve_precision(cpu, "bf16") == "bf16"
    described = precision.describe(cpu, "auto")
    assert described["resolved"] == expected and described["setting"] == "auto"
    assert ("no bf16" in described["reason"]) == (expected == "fp32")
    with precision.autocast_for(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")


def test_attention_runs_in_float32_under_cpu_autocast_and_float64_stays():
    from myopia.attention.dispatch import attention_precision

    q = torch.randn(1, 2, 4, 8)
    v = q.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with attention_precision(q, q, v) as (a, b, c):
            assert (a.dtype, c.dtype) == (torch.float32, torch.float32) and not torch.is_autocast_enabled("cpu")
        with attention_precision(q.double(), q.double(), q.double()) as (a, _, _):
            assert a.dtype == torch.float64
    with attention_precision(v, v, v) as (a, _, _):  # no autocast: as given
        assert a.dtype == torch.bfloat16


def _same_forward(models, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [m(x, targets=y) for m in models]
    return all(torch.equal(losses[0], other) for other in losses[1:])


def test_every_arm_of_our_gpt_has_the_same_bf16_forward():
    from myopia import GPT, GPTConfig

    models = []
    for cut in ("vanilla", "myopic", "myopic_kv", "myopic:h=2"):
        torch.manual_seed(0)
        models.append(GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=16, attention=cut)))
    x, y = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    assert _same_forward(models, x, y)


def test_every_arm_of_a_hugging_face_model_has_the_same_bf16_forward():
    """The vanilla arm keeps myopia's attention function (float32 on a CPU under autocast), as its myopic
    twins do; transformers' own SDPA would compute it in bfloat16 and the first steps would differ."""
    pytest.importorskip("transformers")
    from myopia.models.hf.presets import build_hf_model

    models = [build_hf_model("llama-tiny", cut, vocab_size=128, seed=0) for cut in ("vanilla", "myopic", "myopic_kv")]
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    assert _same_forward(models, x, y)
    models[0].set_attention("myopic").set_attention("vanilla")  # switched back and forth: still the same kernels
    assert _same_forward(models, x, y)


def test_results_record_the_precision(tmp_path, monkeypatch):
    from conftest import write_word_corpus

    from myopia import cli

    monkeypatch.setenv("MYOPIA_NATIVE_BF16", "0")
    folder = write_word_corpus(tmp_path / "corpus", 40, 200)
    out = tmp_path / "run"
    assert cli.main(["lm", "--preset", "tiny", "--data.corpus", str(folder), "--arms", "vanilla,myopic",
                     "--train.steps", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["precision"]["resolved"] == "fp32" and results["precision"]["setting"] == "auto"
    assert (out / "report.md").read_text().splitlines()[2].startswith("**Precision: float32**")
    assert results["first_step_check"]["myopic vs vanilla"]["max_abs"] == 0.0
