"""#32 item 7: `train.report_to` trackers (tensorboard, wandb, mlflow) get the records of
metrics.jsonl; an unknown or missing tracker is one config error naming the key; wandb for
real in offline mode when installed (a stub module otherwise, and for mlflow); eval.command
on exports; and (slow) a tiny SFT run through the entry point from Parquet data with every
tracker and the eval hook, whose losses equal the same run from JSONL."""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import time
import types

import pytest

from nova_engine.config import ConfigError
from nova_engine.recipe import load_recipe
from nova_engine.train.metrics import MetricsLogger, read_metrics, run_eval_command

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "tiny_cpu.yaml")


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


class FakeWandb:
    """The part of wandb's API the tracker uses; every call recorded."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, data, step):
                fake.logs.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        return Run()


class FakeMlflow:
    def __init__(self):
        self.calls, self.metrics = [], []

    def __getattr__(self, name):
        if name in ("set_tracking_uri", "set_experiment", "log_params", "end_run"):
            return lambda *a, **kw: self.calls.append((name, a, kw))
        raise AttributeError(name)

    def start_run(self, **kw):
        self.calls.append(("start_run", (), kw))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=kw.get("run_id", "r123")))

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


@pytest.fixture
def stubs(monkeypatch):
    wb, ml = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", _module("wandb", init=wb.init))
    names = ("set_tracking_uri", "set_experiment", "start_run", "log_params", "end_run")
    attrs = {n: getattr(ml, n) for n in names}
    monkeypatch.setitem(
        sys.modules, "mlflow", _module("mlflow", log_metrics=ml.log_metrics, **attrs)
    )
    return wb, ml


def test_report_to_is_checked_when_the_config_loads(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.report_to: unknown tracker 'neptune'"):
        load_recipe(RECIPE, "sft", ["train.report_to=[tensorboard, neptune]"])
    with pytest.raises(ConfigError, match=r"train\.report_to: a tracker twice"):
        load_recipe(RECIPE, "sft", ["train.report_to=[tensorboard, tensorboard]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a)
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, "sft", ["train.report_to=[mlflow]"])
    assert str(e.value).endswith("train.report_to: mlflow is not installed (pip install mlflow, "
                                 "or remove it from the list)")  # fmt: skip
    run = load_recipe(RECIPE, "sft", ["train.report_to=tensorboard"])  # a scalar is a list of one
    assert run.train.report_to == ["tensorboard"]


def _log_some(m: MetricsLogger, start: int = 0) -> None:
    for s in range(start + 1, start + 4):
        m.log(s, {"loss": 1.0 / (s + 0.5), "lr": 1e-3 * s, "grad_norm": 0.25 * s}, tokens=100)
    m.log(start + 3, {"loss": 0.125, "accuracy": 0.75}, prefix="eval/")


def test_stub_trackers_get_the_metrics_jsonl_records(tmp_path, stubs):
    wb, ml = stubs
    cfg = {"optim": {"lr": 1e-3}, "train": {"seed": 1}}
    with MetricsLogger(tmp_path, total_steps=6, stage="sft", stream=io.StringIO(), enabled=True,
                       tensorboard=False, report_to=["wandb", "mlflow"], config=cfg) as m:  # fmt: skip
        _log_some(m)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    want = [
        (r["step"], {k: v for k, v in r.items() if k != "step" and isinstance(v, float)})
        for r in recs
    ]
    assert len(want) == 4
    assert ml.metrics == want  # mlflow: the records' own names
    assert [s for s, _ in wb.logs] == [s for s, _ in want]
    for (_, got), (_, rec) in zip(wb.logs, want):  # wandb: training keys under train/
        is_eval = any(k.startswith("eval/") for k in rec)  # (TensorBoard's naming rule)
        assert got == {(k if is_eval or "/" in k else f"train/{k}"): v for k, v in rec.items()}
    run_id = open(tmp_path / "wandb_run_id").read().strip()
    (init,) = wb.inits
    assert init["id"] == run_id and init["resume"] == "allow" and init["config"] == cfg
    assert init["dir"] == str(tmp_path) and init["project"] == os.environ.get(
        "WANDB_PROJECT", "nova"
    )
    assert wb.finished == 1
    names = [c[0] for c in ml.calls]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "end_run"]
    assert ml.calls[0][1][0] == "file:" + str(tmp_path / "mlruns")
    assert ml.calls[3][1][0] == {"optim.lr": "0.001", "train.seed": "1"}
    assert ml.calls[2][2]["run_name"] == f"{tmp_path.name}-sft"
    # a resumed run continues the same wandb and MLflow runs (no new MLflow params)
    with MetricsLogger(tmp_path, total_steps=6, stage="sft", stream=io.StringIO(), enabled=True,
                       tensorboard=False, report_to=["wandb", "mlflow"], start_step=3,
                       config=cfg) as m:  # fmt: skip
        _log_some(m, start=3)
    assert wb.inits[1]["id"] == run_id and wb.finished == 2
    assert [c[0] for c in ml.calls[5:]] == [
        "set_tracking_uri", "set_experiment", "start_run", "end_run"
    ]  # fmt: skip
    assert ml.calls[7][2] == {"run_id": "r123"}
    assert [s for s, _ in ml.metrics] == [1, 2, 3, 3, 4, 5, 6, 6]


def test_tensorboard_tracker_matches_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, total_steps=3, stream=io.StringIO(), enabled=True,
                       tensorboard=False, report_to=["tensorboard"]) as m:  # fmt: skip
        _log_some(m)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    for key, tag in (("loss", "train/loss"), ("grad_norm", "train/grad_norm")):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(r["step"], r[key]) for r in recs if key in r]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(got, want))
    assert [e.value for e in acc.Scalars("eval/accuracy")] == [0.75]


@pytest.mark.slow  # wandb starts its service process
def test_wandb_offline_for_real(tmp_path, monkeypatch):
    """The real wandb package in offline mode (no account, no network): the run directory
    under out_dir/wandb is the run id Nova kept, and its log holds the metric names and
    values."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, total_steps=3, stage="sft", stream=io.StringIO(), enabled=True,
                       tensorboard=False, report_to=["wandb"], config={"a": 1}) as m:  # fmt: skip
        _log_some(m)
    run_id = open(tmp_path / "wandb_run_id").read().strip()
    (log,) = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    import wandb

    wandb.teardown()  # the service writes the run's log asynchronously: wait for it
    deadline = time.monotonic() + 60
    while b"eval/accuracy" not in (blob := open(log, "rb").read()) and time.monotonic() < deadline:
        time.sleep(0.5)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    for key in (b"train/loss", b"train/grad_norm", b"eval/accuracy"):
        assert key in blob, key
    for r in recs[:3]:
        assert json.dumps(r["grad_norm"]).encode() in blob


def test_eval_command_logs_exit_code_and_output(tmp_path):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    cmd = (f"{sys.executable} -c \"import os, sys; print(sorted(os.listdir(sys.argv[1])), "
           "os.environ['NOVA_STEP']); sys.exit(3)\" {export}")  # fmt: skip
    info = run_eval_command(cmd, str(export), 7, tmp_path, timeout_s=60)
    assert info["returncode"] == 3 and not info["timed_out"]
    assert info["output"].strip() == "['config.json'] 7"
    assert info["command"].endswith(str(export))
    slow = run_eval_command(f"{sys.executable} -c 'import time; time.sleep(30)'", str(export),
                            8, tmp_path, timeout_s=0.5)  # fmt: skip
    assert slow["timed_out"] and slow["returncode"] is None and slow["seconds"] < 20
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [7, 8]
    assert recs[0]["eval_command"] == info and recs[1]["eval_command"]["timed_out"]


@pytest.mark.slow  # two tiny SFT runs through the entry point
def test_sft_from_parquet_with_trackers_eval_hook_and_resolved_config(tmp_path, stubs):
    """`sft` through the entry point twice on the same data, once as JSONL and once as
    Parquet: the same per-step losses. The Parquet run reports to tensorboard, wandb and
    mlflow (stubs: their records equal metrics.jsonl's), runs eval.command on the final
    export (its output and exit code in metrics.jsonl) and leaves out_dir/config.yaml with
    absolute paths, which reloads as the run's config."""
    import yaml

    from nova_engine.data.synthetic import write_task
    from nova_engine.data.tiny import build_tiny_tokenizer
    from nova_engine.data.tokenize import load_tokenizer
    from nova_engine.model.tiny import build_tiny_hf_model
    from nova_engine.train import __main__ as train_main

    wb, ml = stubs
    tok = build_tiny_tokenizer(tmp_path / "tok")
    sft = write_task(tmp_path / "data", n_sft=24, n_pref=2, n_eval=2, seed=5)["sft"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(sft) as f:
        pq.write_table(pa.Table.from_pylist([json.loads(x) for x in f]), tmp_path / "sft.parquet")
    model = tmp_path / "model"
    build_tiny_hf_model(str(model), "llama", vocab_size=len(load_tokenizer(tok)), hidden_size=32,
                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)  # fmt: skip
    common = [f"model.hf_path={model}", f"model.tokenizer_path={tok}", "data.eval_paths=[]",
              "train.global_batch_size=8", "train.max_steps=2", "train.log_every=1",
              "train.tensorboard=false", "checkpoint.resume=none", "train.save_every=0",
              "checkpoint.hf_in_checkpoints=false", "train.precision=fp32"]  # fmt: skip
    rc = train_main.main(["sft", "--recipe", RECIPE, *common, f"data.train_paths=[{sft}]",
                          f"train.out_dir={tmp_path / 'a'}"])  # fmt: skip
    assert rc == 0
    hook = (
        f'{sys.executable} -c "import os, sys; print(sorted(os.listdir(sys.argv[1])))" {{export}}'
    )
    b_args = [
        *common, f"data.train_paths=[{tmp_path / 'sft.parquet'}]",
        f"train.out_dir={tmp_path / 'b'}", "train.report_to=[tensorboard, wandb, mlflow]",
        f"eval.command={hook}", "eval.on_checkpoints=true", "train.save_every=1",
        "checkpoint.hf_in_checkpoints=true",  # (the last one wins over common's)
    ]  # fmt: skip
    assert train_main.main(["sft", "--recipe", RECIPE, *b_args]) == 0

    def loss(d):
        return [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r]

    assert len(loss("a")) == 2 and loss("a") == loss("b")
    recs = read_metrics(tmp_path / "b" / "metrics.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    assert [(r["step"], r["loss"]) for r in train_recs] == [
        (s, m["loss"]) for s, m in ml.metrics
    ]  # fmt: skip
    assert [m["train/loss"] for _, m in wb.logs] == loss("b") and wb.finished == 1
    assert wb.inits[0]["config"]["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"]
    assert os.listdir(tmp_path / "b" / "tensorboard")
    # each checkpoint's export (eval.on_checkpoints), then the final one
    hooks = [(r["step"], r["eval_command"]) for r in recs if "eval_command" in r]
    ckpts = tmp_path / "b" / "checkpoints"
    assert [(s, h["export"]) for s, h in hooks] == [
        (1, str(ckpts / "step_00000001" / "hf")),
        (2, str(ckpts / "step_00000002" / "hf")),
        (2, str(tmp_path / "b" / "hf")),
    ]  # fmt: skip
    for _, h in hooks:
        assert h["returncode"] == 0 and "config.json" in h["output"], h
        assert "model.safetensors" in h["output"], h
    cfg_path = tmp_path / "b" / "config.yaml"
    d = yaml.safe_load(cfg_path.read_text())["sft"]
    assert d["data"]["train_paths"] == [str(tmp_path / "sft.parquet")]
    assert d["train"]["out_dir"] == str(tmp_path / "b") and d["eval"]["command"] == hook
    again = load_recipe(cfg_path, "sft")
    assert again.to_dict() == load_recipe(RECIPE, "sft", b_args).to_dict()


def test_a_tracker_that_does_not_start_is_one_config_error(tmp_path, monkeypatch):
    """wandb.init failing (no login, no network) stops the run with one line naming
    train.report_to and the cause, after closing the trackers already started."""
    closed = []

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", _module("wandb", init=init))
    import nova_engine.train.metrics as metrics

    monkeypatch.setattr(metrics._TensorBoard, "close", lambda self: closed.append("tb"))
    with pytest.raises(ConfigError) as e:
        MetricsLogger(tmp_path, total_steps=2, stream=io.StringIO(), enabled=True,
                      tensorboard=False, report_to=["tensorboard", "wandb"])  # fmt: skip
    assert str(e.value) == (
        "train.report_to: wandb did not start: RuntimeError: api_key not configured (no-tty) "
        "(without an account: WANDB_MODE=offline)"
    )
    assert closed == ["tb"]
