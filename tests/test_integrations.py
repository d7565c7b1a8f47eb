"""myopia with the tools researchers use: transformers export, lm-evaluation-harness, TensorBoard and
W&B (offline). One tiny text run (two arms, streamed to both trackers) serves every test here."""

import glob
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from conftest import write_word_corpus

transformers = pytest.importorskip("transformers")

from myopia.cli import main
from myopia.interop.export import ExportError, gpt_to_transformers, save_tokenizer
from myopia.models.gpt import GPT, GPTConfig

SHAPES = {
    "gpt2": dict(),
    "gpt2-relu-nobias-untied": dict(activation="relu", bias=False, tie_embeddings=False, mlp_ratio=3),
    "rotary": dict(position="rotary", rotary_base=500.0),
    "rotary-relu-nobias-untied": dict(position="rotary", activation="relu", bias=False, tie_embeddings=False),
}


def random_gpt(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=32, block_size=16, **kw)).eval()
    with torch.no_grad():  # non-zero biases and norms, so that every mapped tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_export_logits_equal(shape, tmp_path):
    model = random_gpt(**SHAPES[shape])
    gpt_to_transformers(model).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), loaded(input_ids=x).logits
    assert loaded.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-5
    assert type(loaded).__name__ == ("GPTNeoXForCausalLM" if "rotary" in shape else "GPT2LMHeadModel")


@pytest.mark.parametrize("kw,option", [(dict(n_kv_head=2), "n_kv_head=2"),
                                       (dict(n_kv_head=1, position="rotary"), "n_kv_head=1"),
                                       (dict(input_dim=3, output_dim=1), "input_dim=3")])
def test_export_refuses_shapes_without_equivalent(kw, option):
    with pytest.raises(ExportError) as err:
        gpt_to_transformers(random_gpt(**kw))
    assert option in str(err.value) and "\n" not in str(err.value)


def test_byte_tokenizer_round_trip(tmp_path):
    from myopia.data.tokenizer import byte_tokenizer

    save_tokenizer(byte_tokenizer(), str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Call me Ishmael. Ünïcode ✓\n  two spaces"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(tok(text)["input_ids"]) == text


# --- one tiny run for export, eval and the trackers ---------------------------------------------------


def _read_wandb_records(path):
    """Records of a W&B offline run file (its LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, buf = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("integrations")
    corpus = write_word_corpus(root / "corpus", 40, 120)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "myopia-test",
           "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        out = root / "run"
        assert main(["train", "--out", str(out), "--data.source", "text", "--data.text.corpus", str(corpus),
                     "--data.text.vocab_size", "300", "--data.text.seq_len", "16",
                     "--data.text.cache_dir", str(root / "cache"), "--model.n_layer", "1", "--model.n_head", "2",
                     "--model.n_embd", "32", "--train.steps", "6", "--train.batch_size", "8",
                     "--train.eval_every", "3", "--train.eval_batches", "2", "--train.log_every", "2",
                     "--train.progress", "false", "--train.log_to", "tensorboard,wandb"]) == 0
        yield out, root, mp


def test_tensorboard_streams_metrics_and_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    for arm in ("vanilla", "myopic"):
        records = [json.loads(line) for line in open(out / arm / "metrics.jsonl")]
        acc = EventAccumulator(str(out / arm / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
            want = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            assert want and key in tags
            got = [(e.step, e.value) for e in acc.Scalars(key)]
            assert [s for s, _ in got] == [s for s, _ in want]
            assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want))
        config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert '"steps": 6' in config and '"log_to"' in config
        from tensorboard.plugins.hparams import plugin_data_pb2

        hparams = plugin_data_pb2.HParamsPluginData()  # the config as hyper-parameters
        hparams.ParseFromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert hparams.session_start_info.hparams["train.steps"].number_value == 6
        assert hparams.session_start_info.hparams["out"].string_value == str(out)


def test_wandb_offline_run_per_arm(run):
    out, _, _ = run
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "*.wandb")))
    assert len(files) == 2
    names = set()
    for path in files:
        records = _read_wandb_records(path)
        (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        names.add(run_rec.display_name)
        assert run_rec.run_group == "run" and run_rec.project == "myopia-test"
        config = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
        assert config["train"]["steps"] == 6
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                for item in r.history.item:
                    key = item.key or "/".join(item.nested_key)
                    history.setdefault(key, {})[int(r.history.step.num)] = json.loads(item.value_json)
        metrics = [json.loads(line) for line in open(out / run_rec.display_name / "metrics.jsonl")]
        for rec in metrics:
            for key, value in rec.items():
                if key != "step" and isinstance(value, float):
                    assert history[key][rec["step"]] == pytest.approx(value, rel=1e-12)
    assert names == {"vanilla", "myopic"}


def test_missing_tracker_extra_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["train", "--out", str(tmp_path / "r"), "--train.steps", "1", "--train.progress", "false",
                 "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2", "--train.log_to", "wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install 'myopia[wandb]'" in err


def test_export_cli_loads_without_myopia(run, tmp_path):
    """myopia export RUN/ARM OUT: plain transformers (myopia blocked from import) loads the model and
    the tokenizer; logits equal myopia's to 1e-5 and the tokenizer round-trips text."""
    from myopia.interop.export import run_config, run_tokenizer
    from myopia.runs.arms import Arm, load_model

    out, _, _ = run
    assert main(["export", str(out / "myopic"), str(tmp_path / "hf")]) == 0
    text = "the cat sat on the mat and then it ran under a big log."
    tokenizer = run_tokenizer(run_config(str(out / "myopic")))
    ids = tokenizer.encode_batch([text])[0]
    model = load_model(str(out / "myopic"), Arm("vanilla", "vanilla"), {}).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids]))
    script = f"""
import sys, json, torch
sys.modules['myopia'] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()
ids = tok({text!r}, add_special_tokens=False)['input_ids']
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits
torch.save(logits, {str(tmp_path / 'logits.pt')!r})
gen = model.generate(torch.tensor([ids[:4]]), max_new_tokens=5, do_sample=False)
print(json.dumps({{"ids": ids, "decoded": tok.decode(ids), "generated": gen.shape[1]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == ids and got["decoded"] == text and got["generated"] == 9
    assert (torch.load(tmp_path / "logits.pt") - want).abs().max().item() < 1e-5


def test_export_refuses_bigram_arm(run, tmp_path, capsys):
    """A bigram arm's forward attends only to itself: exported as causal attention it would silently
    compute something else, so export refuses (its checkpoint, relabelled bigram, stands in)."""
    out, _, _ = run
    fake = tmp_path / "run"
    shutil.copytree(out / "myopic", fake / "bigram")
    shutil.copy(out / "config.yaml", fake / "config.yaml")
    ckpt = sorted((fake / "bigram" / "checkpoints").glob("step_*"))[-1]
    state = json.loads((ckpt / "state.json").read_text())
    state["model_config"]["attention"] = "bigram"
    (ckpt / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["state.json"] = hashlib.sha256((ckpt / "state.json").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(fake / "bigram"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "attention=bigram" in err and "\n" not in err


def test_export_refusal_cli(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing" in err


def test_eval_offline_end_to_end(run, tmp_path):
    """myopia eval RUN --tasks myopia_example: the harness's numbers reach results.json and the report
    unchanged, and the paired difference is computed from the harness's logged per-item scores."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from myopia.interop.evaluate import builtin_task_dir, fmt, prefix_token

    out, root, _ = run
    assert main(["eval", str(out), "--tasks", "myopia_example", "--out", str(tmp_path / "ev"),
                 "--batch_size", "8"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    report = (tmp_path / "ev" / "report.md").read_text()
    assert set(results["models"]) == {"vanilla", "myopic"}
    # The harness run directly on the exported vanilla arm gives the same numbers.
    assert main(["export", str(out / "vanilla"), str(tmp_path / "v")]) == 0
    # (myopia's BPE has no BOS/EOS; eval gives the harness the newline token for empty contexts)
    model_args = {"pretrained": str(tmp_path / "v"), "dtype": "float32", "prefix_token_id": prefix_token(str(tmp_path / "v"))}
    direct = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, device="cpu",
        tasks=["myopia_example"], num_fewshot=0, batch_size=8, log_samples=True,
        task_manager=TaskManager(include_path=[builtin_task_dir(str(tmp_path / "tasks"))]))
    want = direct["results"]["myopia_example"]
    got = results["tasks"]["myopia_example"]["vanilla"]
    assert got["acc"] == {"value": want["acc,none"], "stderr": want["acc_stderr,none"]}
    assert got["acc_norm"]["value"] == want["acc_norm,none"]
    assert fmt(want["acc,none"], want["acc_stderr,none"]) in report
    assert direct["n-samples"]["myopia_example"]["effective"] == 40
    pair = results["paired"]["myopia_example"]["myopic"]["acc"]
    m = results["tasks"]["myopia_example"]["myopic"]["acc"]["value"]
    assert pair["n"] == 40 and pair["diff"] == pytest.approx(m - want["acc,none"], abs=1e-12)
    assert pair["stderr"] >= 0 and fmt(pair["diff"], pair["stderr"], signed=True) in report


def test_core_import_needs_no_extra():
    """import myopia, its GPT, the CLI's config and training loop with every extra blocked."""
    blocked = ["transformers", "tokenizers", "peft", "lm_eval", "tensorboard", "wandb", "matplotlib", "datasets",
               "transformer_lens", "nnsight"]
    script = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
              + "import myopia, myopia.models.gpt, myopia.train.loop, myopia.train.trackers, myopia.models.hf.lora, "
                "myopia.lora, myopia.generation, myopia.interop.export, myopia.interop.evaluate, myopia.cli\n"
                "myopia.cli._commands()\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
