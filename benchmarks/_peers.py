"""The peers of `benchmarks/bench_vs_peers.py`: TRL's SFTTrainer and DPOTrainer runs, timed
step by step from a callback, and the helpers the plain Hugging Face loops share with them.
TRL is an optional dependency (the `bench` extra); it is imported only when a TRL run starts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

LR = 1e-5
BETA = 0.1  # TRL's default sigmoid-DPO beta


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.config.use_cache = False
    return m.train()


def _split(s) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) ids of a Sample whose loss mask is 1 on the response only."""
    first = int(np.argmax(s.loss_mask))
    return s.tokens[:first], s.tokens[first:]


def _step_timer(times: list[float], on_step_end):
    """A TrainerCallback that appends each step's seconds to `times`, then calls
    `on_step_end()` (outside the timed span)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            on_step_end()

    return Timer()


def _recording(trainer_cls, losses: list[float]):
    """`trainer_cls` recording every loss it computes into `losses`."""

    class Recording(trainer_cls):
        def compute_loss(self, *a, **k):
            out = super().compute_loss(*a, **k)
            losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    return Recording


def trl_sft(model_dir, tok_dir, samples, out_dir, steps, on_step_end):
    """TRL's SFTTrainer on the pre-tokenized samples; `on_step_end()` runs after each of its
    steps (outside its timing). Returns (per-step seconds, step-1 loss)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"input_ids": [s.tokens.tolist() for s in samples]})
    cfg = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=len(samples), max_steps=steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        max_length=max(len(s.tokens) for s in samples), packing=False,
        activation_checkpointing=False, dataloader_num_workers=0, seed=0, bf16=False, fp16=False,
        disable_tqdm=True,
    )  # fmt: skip
    times: list[float] = []
    losses: list[float] = []
    trainer = _recording(SFTTrainer, losses)(
        model=_hf_model(model_dir), args=cfg, train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(tok_dir),
        callbacks=[_step_timer(times, on_step_end)],
    )  # fmt: skip
    trainer.train()
    return times, losses[0], trainer


def trl_dpo(model_dir, tok_dir, pairs, out_dir, steps, on_step_end):
    """TRL's DPOTrainer (precomputed reference log-probs) on the pairs as text that encodes
    back to the same ids (checked); `on_step_end()` runs after each of its steps (outside its
    timing). Returns (per-step seconds, step-1 loss, reference-pass seconds, (chosen [P],
    rejected [P]) reference sums, trainer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    parts = [(_split(p.chosen), _split(p.rejected)) for p in pairs]
    ds = Dataset.from_dict({
        "prompt": [tok.decode(c[0]) for c, _ in parts],
        "chosen": [tok.decode(c[1]) for c, _ in parts],  # ends with eos: TRL adds none
        "rejected": [tok.decode(r[1]) for _, r in parts],
    })  # fmt: skip
    cfg = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=len(pairs), max_steps=steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        max_length=max(len(s) for p in pairs for s in (p.chosen, p.rejected)),
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        activation_checkpointing=False, dataloader_num_workers=0, seed=0, bf16=False,
        fp16=False, disable_tqdm=True,
    )  # fmt: skip
    times, losses, ref_secs = [], [], []

    class Recording(_recording(DPOTrainer, losses)):
        def _precompute_ref_logps(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            ref_secs.append(time.perf_counter() - t0)
            return out

    trainer = Recording(model=_hf_model(model_dir), args=cfg, train_dataset=ds,
                        processing_class=tok, callbacks=[_step_timer(times, on_step_end)])  # fmt: skip
    got = trainer.train_dataset
    for i, ((prompt, chosen), (_, rejected)) in enumerate(parts):
        row = got[i]
        ours = (prompt.tolist(), chosen.tolist(), rejected.tolist())
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != ours:
            raise AssertionError(f"pair {i}: TRL tokenized the text to other ids than ours")
    ref = (np.asarray(got["ref_chosen_logps"], np.float64),
           np.asarray(got["ref_rejected_logps"], np.float64))  # fmt: skip
    trainer.train()
    return times, losses[0], ref_secs[0], ref, trainer


def _trl_step(trainer):
    """One more TRL step outside `train()` (its training_step + optimizer step) on its first
    batch: for peak memory."""
    batch = next(iter(trainer.get_train_dataloader()))

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step
