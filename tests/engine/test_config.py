"""Config: the shipped recipes load with the Tülu 3 numbers, overrides are typed by the
dataclass fields, unknown keys and bad values name the key, world/layout validation, a stable
hash and a lossless dict round trip."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nova_engine.config import ConfigError, ModelConfig, ParallelConfig, config_hash
from nova_engine.recipe import config_from_dict, load_recipe
from nova_engine.train.stages.dpo import DPORunConfig
from nova_engine.train.stages.sft import SFTRunConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["tiny_cpu", "llama3_8b", "llama3_70b", "qwen2_72b"])
def test_recipes_load(name):
    sft = load_recipe(RECIPES / f"{name}.yaml", "sft")
    dpo = load_recipe(RECIPES / f"{name}.yaml", "dpo")
    assert isinstance(sft, SFTRunConfig) and isinstance(dpo, DPORunConfig)
    assert dpo.model.hf_path == f"{sft.train.out_dir}/hf"  # DPO starts from the SFT export
    assert dpo.loss.loss_type == "dpo_norm" and dpo.loss.beta == 5.0


@pytest.mark.parametrize(
    "name,sft_lr,dpo_lr,layout",
    [
        ("llama3_8b", 5e-6, 5e-7, (2, 1, True)),
        ("llama3_70b", 2e-6, 2e-7, (8, 4, True)),
        ("qwen2_72b", 2e-6, 2e-7, (8, 4, True)),
    ],
)
def test_tulu3_hyperparameters(name, sft_lr, dpo_lr, layout):
    sft = load_recipe(RECIPES / f"{name}.yaml", "sft")
    dpo = load_recipe(RECIPES / f"{name}.yaml", "dpo")
    assert (sft.optim.lr, sft.train.epochs, sft.train.global_batch_size) == (sft_lr, 2, 128)
    assert (sft.data.max_length, sft.optim.schedule, sft.optim.warmup_ratio) == (
        4096,
        "linear",
        0.03,
    )
    assert (dpo.optim.lr, dpo.train.epochs, dpo.train.global_batch_size) == (dpo_lr, 1, 128)
    assert (dpo.data.max_length, dpo.optim.schedule, dpo.optim.warmup_ratio) == (
        2048,
        "linear",
        0.1,
    )
    assert sft.optim.weight_decay == dpo.optim.weight_decay == 0.0
    for run in (sft, dpo):
        assert (run.parallel.tp, run.parallel.pp, run.parallel.sp) == layout
        assert run.train.precision == "bf16" and run.train.recompute == "selective"
        assert run.validate_world(64) == 64 // (layout[0] * layout[1])


def test_overrides_are_typed():
    run = load_recipe(
        RECIPES / "tiny_cpu.yaml",
        "sft",
        [
            "optim.lr=5e-3",  # PyYAML reads this as a string; the float field converts it
            "train.max_steps=10",
            "parallel.distributed_optimizer=true",
            "data.train_paths=[a.jsonl, b.jsonl]",
            "data.eval_paths=c.jsonl",
            "optim.betas=[0.9, 0.95]",
            "model.hf_path=1234",  # str field: the text, not the int
            "optim.warmup_ratio=null",
            "optim.warmup_steps=7",
            "train.epochs=3.0",
            "data.eval_max_samples=none",
        ],
    )
    assert run.optim.lr == 5e-3 and isinstance(run.optim.lr, float)
    assert run.train.max_steps == 10 and run.parallel.distributed_optimizer is True
    assert run.data.train_paths == ["a.jsonl", "b.jsonl"] and run.data.eval_paths == ["c.jsonl"]
    assert run.optim.betas == (0.9, 0.95) and run.model.hf_path == "1234"
    assert run.optim.warmup_ratio is None and run.optim.warmup_steps == 7
    assert run.train.epochs == 3 and isinstance(run.train.epochs, int)
    assert run.data.eval_max_samples is None
    # the stage section wins over the shared one, overrides win over both
    assert run.model.tokenizer_path == "demo_out/tokenizer" and run.model.build.hidden_size == 128
    assert load_recipe(RECIPES / "tiny_cpu.yaml", "dpo").model.build is None
    kw = run.model.build.hf_config_kwargs()
    assert kw["num_hidden_layers"] == 4 and "init_seed" not in kw and "family" not in kw


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "optim.lrr: unknown key; valid keys here: lr, min_lr, weight_decay, betas, eps, grad_clip, schedule, warmup_steps, warmup_ratio"),
        ("optimizer.lr=1", "optimizer: unknown key; valid keys here: model, parallel, data, optim, train, checkpoint, eval"),
        ("loss.beta=1", "loss: unknown key; valid keys here: model, parallel, data, optim, train, checkpoint, eval"),
        ("train.epochs=two", "train.epochs: expected int, got 'two'"),
        ("train.epochs=1.5", "train.epochs: expected int, got 1.5"),
        ("train.recompute=partial", "train.recompute: expected one of 'none', 'selective', 'full', got 'partial'"),
        ("parallel.sp=maybe", "parallel.sp: expected bool, got 'maybe'"),
        ("optim.betas=[0.9]", "optim.betas: expected tuple[float, float], got [0.9]"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("parallel.tp=0", "parallel.tp: expected an integer >= 1, got 0"),
        ("parallel.sp=true", "parallel.sp: sequence parallelism needs tp > 1"),
        ("parallel.vpp=2", "parallel.vpp: virtual stages need pp > 1"),
        ("optim.warmup_steps=3", "optim.warmup_steps: set warmup_steps or warmup_ratio, not both"),
        ("optim.min_lr=1", "optim.min_lr: expected 0 <= min_lr <= lr=0.002"),
        ("data.format=pairs", 'data.format: the sft stage reads "chat" data, got "pairs"'),
        ("data.max_length=4096", "train.micro_batch_tokens: 2048 cannot hold one sft sample of up to 4096 tokens (data.max_length=4096)"),
        ("model.build.num_attention_heads=3", "model.build.hidden_size: 128 does not divide by num_attention_heads=3"),
        ("noequals", 'noequals: expected an override of the form "a.b.c=value"'),
    ],
)  # fmt: skip
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as ei:
        load_recipe(RECIPES / "tiny_cpu.yaml", "sft", [override])
    assert message in str(ei.value)
    assert str(ei.value).endswith(message)


def test_dpo_loss_section_is_the_losses_config():
    """DPO's hyperparameters are defined once (nova_engine.losses.dpo.DPOConfig): the
    recipe's `loss:` section is that class plus ref_cache_dir, with errors naming the key."""
    from nova_engine.losses.dpo import DPOConfig

    run = load_recipe(
        RECIPES / "tiny_cpu.yaml",
        "dpo",
        ["loss.loss_type=cdpo", "loss.label_smoothing=0.1", "loss.beta=0.2"],
    )
    cfg = run.loss
    assert isinstance(cfg, DPOConfig)
    assert (cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.gamma_beta_ratio) == (
        "cdpo",
        0.2,
        0.1,
        0.5,
    )
    with pytest.raises(
        ConfigError, match=r"loss\.label_smoothing: cdpo needs a value in \(0, 0\.5\)"
    ):
        load_recipe(RECIPES / "tiny_cpu.yaml", "dpo", ["loss.loss_type=cdpo"])
    with pytest.raises(ConfigError, match=r"loss\.label_smoothing: ipo takes none"):
        load_recipe(
            RECIPES / "tiny_cpu.yaml", "dpo", ["loss.loss_type=ipo", "loss.label_smoothing=0.1"]
        )


def test_dpo_errors_and_validate_world():
    from nova_engine.losses.dpo import DPO_LOSSES

    with pytest.raises(ConfigError) as ei:
        load_recipe(RECIPES / "tiny_cpu.yaml", "dpo", ["loss.loss_type=orpo"])
    assert str(ei.value).endswith(
        f"loss.loss_type: expected one of {', '.join(DPO_LOSSES)}, got 'orpo'"
    )
    with pytest.raises(ConfigError, match=r"1000 cannot hold one dpo sample of up to 1024 tokens"):
        load_recipe(
            RECIPES / "tiny_cpu.yaml",
            "dpo",
            ["data.max_length=512", "train.micro_batch_tokens=1000"],
        )
    run = load_recipe(RECIPES / "llama3_70b.yaml", "sft")
    assert run.validate_world(32) == 1 and run.validate_world(128) == 4
    with pytest.raises(
        ConfigError, match=r"parallel: world size 48 is not a multiple of tp\*pp = 8\*4 = 32"
    ):
        run.validate_world(48)
    with pytest.raises(ConfigError, match="128 sequences do not split over dp=3 ranks"):
        run.validate_world(96)
    ParallelConfig(pp=4, vpp=5).validate_layers(80)
    with pytest.raises(ConfigError, match="80 layers do not split over pp\\*vpp = 12 chunks"):
        ParallelConfig(pp=4, vpp=3).validate_layers(80)


def test_recipe_file_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {hf_path: m}\nsfft:\n  train: {epochs: 1}\n")
    with pytest.raises(
        ConfigError,
        match=r"r\.yaml: sfft: unknown top-level key; valid keys: checkpoint, critic, data, eval, loss, model, optim, parallel, reward_model, rlvr, rollout, train; stages: sft, dpo, rm, rlvr",
    ):
        load_recipe(p, "sft")
    p.write_text("model: {hf_path: m}\nsft:\n  train: {epochs: 1, batch: 8}\n")
    with pytest.raises(
        ConfigError,
        match=r"r\.yaml \[sft\]: train\.batch: unknown key; valid keys here: global_batch_size",
    ):
        load_recipe(p, "sft")
    with pytest.raises(ConfigError, match="the recipe has no 'dpo' section"):
        load_recipe(p, "dpo")
    p.write_text("sft:\n  train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml \[sft\]: model: missing required key"):
        load_recipe(p, "sft")
    p.write_text("model: {hf_path: m}\nsft: {}\n")
    assert load_recipe(p, "sft").model == ModelConfig(hf_path="m")


def test_schedule_helpers():
    run = load_recipe(RECIPES / "llama3_8b.yaml", "sft")
    # 1000 samples, batch 128 -> ceil(1000/128) = 8 steps per epoch, 2 epochs
    assert run.train.total_steps(1000) == 16
    assert run.optim.warmup_for(16) == 0  # int(16 * 0.03) = int(0.48)
    assert run.optim.warmup_for(1000) == 30
    run = load_recipe(
        RECIPES / "llama3_8b.yaml",
        "sft",
        ["train.max_steps=5", "optim.warmup_ratio=null", "optim.warmup_steps=2"],
    )
    assert run.train.total_steps(10**6) == 5 and run.optim.warmup_for(5) == 2


def test_hash_and_dict_round_trip():
    a = load_recipe(RECIPES / "tiny_cpu.yaml", "dpo")
    b = load_recipe(RECIPES / "tiny_cpu.yaml", "dpo")
    c = load_recipe(RECIPES / "tiny_cpu.yaml", "dpo", ["loss.beta=2.5"])
    assert a.hash() == b.hash() == config_hash(a) and a.hash() != c.hash()
    assert len(a.hash()) == 16
    assert config_from_dict(a.to_dict()) == a
    assert config_from_dict(c.to_dict()).loss.beta == 2.5
    assert config_hash({"x": 1, "y": [1, 2]}) == config_hash({"y": (1, 2), "x": 1})
    # the same in a fresh interpreter (no dependence on hash randomization)
    code = textwrap.dedent(f"""
        from nova_engine.recipe import load_recipe
        print(load_recipe({str(RECIPES / "tiny_cpu.yaml")!r}, "dpo").hash())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == a.hash()
    assert set(a.ref_config()) == {
        "tokenizer_dir",
        "max_length",
        "truncation",
        "on_bad_line",
        "margin_key",
        "template",
        "precision",
    }


def test_stage_registry_is_the_one_list():
    from nova_engine import cli
    from nova_engine.train import __main__ as train_main
    from nova_engine.train.stages import STAGES

    assert tuple(STAGES) == ("sft", "dpo", "rm", "rlvr")
    assert cli._stages() == tuple(STAGES) == tuple(train_main.STAGES)
    assert STAGES["sft"].config_class is SFTRunConfig
    assert STAGES["dpo"].config_class is DPORunConfig
    with pytest.raises(ConfigError, match="unknown stage 'ppo'; expected one of sft, dpo, rm"):
        load_recipe(RECIPES / "tiny_cpu.yaml", "ppo")


def test_layout_is_validated_against_the_model_before_any_group(tmp_path):
    """validate_layout reads the model's config.json (no process group needed) and names the
    parallel key and the model dimension it does not divide."""
    import json

    model = tmp_path / "m"
    model.mkdir()
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
           "intermediate_size": 512, "num_hidden_layers": 6}  # fmt: skip
    (model / "config.json").write_text(json.dumps(cfg))

    def run(*overrides):
        return load_recipe(RECIPES / "tiny_cpu.yaml", "sft", [f"model.hf_path={model}",
                           "model.build=null", "train.global_batch_size=8", *overrides])  # fmt: skip

    assert run("parallel.tp=2").validate_layout(4) == 2
    assert run("parallel.pp=3", "parallel.vpp=2").validate_layout(3) == 1  # 6 layers / 6
    cases = [
        (["parallel.tp=4"], 4, "parallel.tp: tp=4 does not divide num_key_value_heads=2"),
        (["parallel.pp=4"], 4, "parallel.pp: pp*vpp = 4*1 = 4 does not divide num_hidden_layers=6"),
    ]  # fmt: skip
    for overrides, world, message in cases:
        with pytest.raises(ConfigError) as ei:
            run(*overrides).validate_layout(world)
        assert message in str(ei.value) and str(model / "config.json") in str(ei.value)
    cfg["vocab_size"] = 1001
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="parallel.tp: tp=2 does not divide vocab_size=1001"):
        run("parallel.tp=2").validate_layout(2)
