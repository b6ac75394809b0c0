"""The memory and step-time model behind `nova plan` (and checked by `nova dryrun`).

Everything here is arithmetic on a `ModelArch` (an HF config.json) and a `Layout`; nothing
imports torch or megatron, so the planner runs anywhere in milliseconds.

Per-rank memory of one training step (bytes; b = activation/weight dtype bytes, 2 for bf16):

    static   = weights (params x b) + grads (params x 4: megatron DDP keeps fp32 main grads,
               `grad_reduce_in_fp32=True`) + optimizer (bf16: fp32 master + Adam m, v = 12 bytes
               per param; fp32: m, v = 8 bytes, the params are their own masters), the
               optimizer divided by DP with the distributed optimizer (ZeRO-1).
               = megatron's `theoretical_memory_usage` (18 or 6 + 12/dp bytes per param),
               but per pipeline stage exactly: stage 0 adds the embedding, the last stage the
               final norm and LM head (or a score head), params counted exactly (GQA, Qwen2's
               q/k/v bias), not with megatron's 10 h^2 (1 + ...) closed form.
    activ.   = in-flight micro-batches x layers of this rank x per-layer bytes (below),
               + the embedding's saved token ids, the final norm and the loss kernel's saved
               tensors on the last stage, + the p2p tensors the schedule holds per micro-batch.
    transient= the larger of one layer's backward working set and the LM-head kernel's
               workspace (last stage), plus a fixed reserve (CUDA context, NCCL buffers,
               allocator fragmentation; `reserve_gib`).

Micro-batches in flight (megatron-core's schedules): 1F1B without interleaving holds
min(pp - p, m) micro-batches on stage p; interleaved 1F1B holds min(2 (pp - p - 1) +
(vpp - 1) pp + 1, m vpp) chunk-micro-batches of L / (pp vpp) layers each, i.e. megatron's
penalty 1 + (pp - 1) / (pp vpp) on stage 0.

Per-layer activations follow Korthikanti et al. 2022 (arXiv 2205.05198, Table 2) in method
-- count the tensors autograd saves, divide the tensor-parallel ones by tp and, with sequence
parallelism, the others by tp too -- but the terms are those of Nova's layer (megatron-core
0.16.1 local spec + Nova's RMSNorm and packed core attention), per token:

    RMSNorm (x2)      4h (fp32 input) + 4 (rstd) + b h (normalized) + b h (the next
                      linear's input)                                       / sp_div
    QKV, RoPE         b (q + 2kv) (QKV output, held by v's view) + b (q + kv) (RoPE outputs)
                      / tp; cos/sin tables 4 b d_head (replicated)
    core attention    flash/varlen (GPU): b q (output, = proj input) + 4 heads (lse) / tp
    SwiGLU MLP        b (2f + f + f + f) / tp: fc1 output, silu(x), x_lin + 0 (megatron's
                      glu offset), fc2 input

where q = heads x d_head, kv = kv_heads x d_head, f = ffn size, sp_div = tp with SP else 1.
Departures from the paper / megatron's estimate, and why:
- SwiGLU and GQA: the paper's 34 s b h counts a GeLU MLP of 4h and full-width K/V; here
  the gated MLP (5 f b) and the narrower K/V are counted as they are.
- No dropout (Llama/Qwen2 train without it): no masks; the paper's 5 a s/h attention-score
  term does not exist with flash/varlen attention (only the fp32 log-sum-exp).
  "selective" recompute (megatron: core attention) therefore saves only the lse here.
- Nova's RMSNorm is unfused (HF-exact numerics): it keeps an fp32 copy of its input
  (4h + b h per norm instead of the fused kernel's b h).
- Packed THD batches: `micro_batch_tokens` tokens per micro-batch, no padding rows; the
  attention span for FLOPs is the mean document length, not the micro-batch length.
- No logits: megatron's 4 s b h (1 + V/h) output-layer term (fp32 logits) is replaced by
  the fused kernel's bounded workspace (`nova_kernels.ops.linear_logprobs._WORKSPACE_ELEMS`
  elements per chunk) and the tensors it saves (SFT's `linear_cross_entropy` keeps
  grad_hidden [N, h] and grad_W [V/tp, h] from forward to backward; `linear_logprobs`
  keeps lse and mu, 8 bytes a token, and allocates them in backward).
- full recompute (uniform, 1 layer per checkpoint) keeps each layer's input (b h / sp_div)
  and re-materializes one layer in backward.

Async RLVR (`rlvr.mode: async`): the world splits into a training group (the recipe's
layout over world - rlvr.generation_ranks ranks: the terms above, without the KV cache) and
a generation group (`generation_memory`: frozen weights + KV cache + reserve per rank).

LoRA (`model.lora`, Workload.lora_rank > 0): the base weights are frozen: weights x b, no
grads, no optimizer state; the adapters (`lora_params`: shapes of nova_engine.model.lora) and
a score head train with the usual 2 + 4 + 12 bytes (bf16 params, fp32 main grads, fp32
master + Adam m, v; /dp with ZeRO-1); each adapter keeps u = A x (r values a token) for
backward; an LM-head adapter materializes W + s B A ([V/tp, h], b bytes) on the last stage.
No reference copy (DPO, RLVR: the base with the adapters off); the backward computes no
weight gradients of the base (-2N FLOPs a token). RLVR's critic is planned the same way when
`critic.lora` is set (its own frozen base + adapters + its score head), else in full.

Step time (projected): tokens x FLOPs per token (PaLM's 6N + 12 L h S, as
`nova_engine.train.metrics.flops_per_token`; recompute adds its forward FLOPs: 2N + 4 L h S
for full, the attention core's 4 L h S for selective; DPO adds the reference forward) at a
stated fraction of the GPU's dense bf16 peak, times the pipeline bubble 1 + (pp - 1) /
(m vpp). Communication is not modelled beyond that single efficiency; the ranking of layouts
is by this projected time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from nova_engine.model.arch import ModelArch

GiB = 1024**3
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM data sheet
DEFAULT_EFFICIENCY = 0.40  # fraction of peak the projection assumes
WORKSPACE_ELEMS = 1 << 26  # nova_kernels.ops.linear_logprobs._WORKSPACE_ELEMS (GPU chunk bound)
STAGE_KINDS = ("sft", "dpo", "rm", "rlvr")
RECOMPUTE = ("none", "selective", "full")


def kernel_workspace_elems() -> int:
    """The fused log-prob kernels' chunk bound (elements of one logits chunk) on GPU, read
    from nova_kernels when importable (falls back to the value this module was written for)."""
    try:
        from nova_kernels.ops import linear_logprobs as k

        return int(k._WORKSPACE_ELEMS)
    except Exception:  # noqa: BLE001 - triton missing: the documented constant
        return WORKSPACE_ELEMS


@dataclass(frozen=True)
class Layout:
    """A parallel layout: world = tp * pp * dp."""

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank."""
    sp: bool = False
    distributed_optimizer: bool = True
    recompute: str = "selective"

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp, self.vpp) < 1:
            raise ValueError(f"layout sizes must be >= 1: {self}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {RECOMPUTE}")
        if self.vpp > 1 and self.pp < 2:
            raise ValueError("vpp > 1 needs pp > 1")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        v = f" VP{self.vpp}" if self.vpp > 1 else ""
        sp = "+SP" if self.sp else ""
        return f"TP{self.tp}{sp} PP{self.pp}{v} DP{self.dp} {self.recompute}"


@dataclass(frozen=True)
class Workload:
    """What one optimizer step runs, per DP rank."""

    stage: str = "sft"
    """sft (fused cross-entropy), dpo (log-probs), rm (scalar head), rlvr (PPO/GRPO)."""
    micro_batch_tokens: int = 4096
    """Tokens of one packed micro-batch (THD, batch dimension 1)."""
    microbatches: int = 1
    """Micro-batches per DP rank per optimizer step (m)."""
    precision: str = "bf16"
    mean_doc_len: float = 2048.0
    """Mean packed document length: the attention span of the FLOPs count."""
    num_labels: int = 1
    """Outputs of a score head (rm, the critic)."""
    critic: bool = True
    """rlvr: PPO with a value model (False: GRPO-style, no critic)."""
    rollout_batch: int = 64
    """rlvr: sequences generated at once per DP rank (KV cache rows)."""
    rollout_len: int = 4096
    """rlvr: prompt + response tokens per sequence (KV cache length)."""
    reserve_gib: float = 4.0
    """CUDA context, NCCL buffers and allocator fragmentation, per GPU."""
    lora_rank: int = 0
    """model.lora.rank (0: full training): the base is frozen, only adapters train."""
    lora_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    """model.lora.targets (qkv, proj, fc1, fc2, lm_head)."""
    critic_lora_rank: int = 0
    """rlvr: critic.lora.rank (0: the whole critic trains)."""
    critic_lora_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    """rlvr: critic.lora.targets (an LM head target is ignored: a critic has a score head)."""
    generates: bool = True
    """rlvr: the training ranks also generate (rlvr.mode colocated: their KV cache counts);
    False for the training group of rlvr.mode async (`generation_memory` holds the cache)."""

    def __post_init__(self) -> None:
        if self.stage not in STAGE_KINDS:
            raise ValueError(f"stage={self.stage!r}: expected one of {STAGE_KINDS}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r}: expected bf16 or fp32")

    @property
    def b(self) -> int:
        return 2 if self.precision == "bf16" else 4


# ------------------------------------------------------------------------------- parameters


def layer_params(arch: ModelArch, tp: int) -> tuple[int, int]:
    """(tensor-parallel params of one layer on one TP rank, TP-replicated params of a layer)."""
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    sharded = h * (q + 2 * kv) + q * h + 3 * h * f + ((q + 2 * kv) if arch.qkv_bias else 0)
    return sharded // tp, 2 * h  # two RMSNorm weights, not split


def lora_params(arch: ModelArch, lay: Layout, pp_rank: int, rank: int, targets) -> int:
    """LoRA adapter parameters on one rank of stage `pp_rank` (nova_engine.model.lora):
    a column-parallel target (qkv, fc1, lm_head) has A [r, in] whole and B [out/tp, r]; a
    row-parallel one (proj, fc2) A [r, in/tp] and B [out, r] whole."""
    h, f, d, tp = arch.hidden_size, arch.intermediate_size, arch.head_dim, lay.tp
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    shapes = {  # (in, out, column?)
        "qkv": (h, q + 2 * kv, True), "proj": (q, h, False),
        "fc1": (h, 2 * f, True), "fc2": (f, h, False),
    }  # fmt: skip
    per_layer = 0
    for t in targets:
        if t in shapes:
            n_in, n_out, column = shapes[t]
            per_layer += (
                rank * n_in + n_out * rank // tp if column else rank * n_in // tp + n_out * rank
            )
    n = per_layer * (arch.num_layers // lay.pp)
    if "lm_head" in targets and pp_rank == lay.pp - 1:
        n += rank * h + arch.vocab_size * rank // tp
    return n


def layers_of_chunk(arch: ModelArch, lay: Layout) -> int:
    return arch.num_layers // (lay.pp * lay.vpp)


def stage_params(
    arch: ModelArch, lay: Layout, pp_rank: int, head: str = "lm", num_labels: int = 1
) -> dict[str, int]:
    """Parameters held by one rank (any TP rank) of pipeline stage `pp_rank`, by part.

    head: "lm" (the LM head, or the tied embedding's copy on the last stage when pp > 1) or
    "score" (a [num_labels, h] head replicated over TP, for reward and value models)."""
    h, v, tp = arch.hidden_size, arch.vocab_size, lay.tp
    sharded, replicated = layer_params(arch, tp)
    n_layers = arch.num_layers // lay.pp
    out = {"layers": n_layers * (sharded + replicated)}
    first, last = pp_rank == 0, pp_rank == lay.pp - 1
    if first:
        out["embedding"] = v * h // tp
    if last:
        out["final_norm"] = h
        if head == "score":
            out["score_head"] = num_labels * h
        elif not (arch.tie_word_embeddings and first):
            out["lm_head"] = v * h // tp
    return out


def replicated_params(
    arch: ModelArch, lay: Layout, pp_rank: int, head: str = "lm", num_labels: int = 1
) -> int:
    """The part of `stage_params` that every TP rank holds whole (norms, a score head)."""
    n = (arch.num_layers // lay.pp) * layer_params(arch, lay.tp)[1]
    if pp_rank == lay.pp - 1:
        n += arch.hidden_size + (num_labels * arch.hidden_size if head == "score" else 0)
    return n


def model_params(arch: ModelArch, head: str = "lm", num_labels: int = 1) -> int:
    """Unique parameters of the model (tied embeddings once)."""
    if head == "lm":
        return arch.num_params
    h, v = arch.hidden_size, arch.vocab_size
    return arch.num_params - (0 if arch.tie_word_embeddings else v * h) + num_labels * h


# ------------------------------------------------------------------------------ activations


def layer_activation_terms(arch: ModelArch, lay: Layout, b: int) -> dict[str, float]:
    """Bytes per token that one decoder layer keeps for backward (flash/varlen attention),
    by term, for the layout's recompute mode (see the module docstring)."""
    h, f, d, tp = arch.hidden_size, arch.intermediate_size, arch.head_dim, lay.tp
    q, kv, heads = arch.num_heads * d, arch.num_kv_heads * d, arch.num_heads
    spd = tp if lay.sp else 1
    if lay.recompute == "full":
        return {"layer input (full recompute)": b * h / spd}
    norm = 4 * h + 4 + b * h + b * h  # fp32 input copy, rstd, normalized, next linear's input
    terms = {
        "rmsnorm x2": 2 * norm / spd,
        "qkv + rope": (b * (q + 2 * kv) + b * (q + kv)) / tp + 4 * b * d,
        "attention out": b * q / tp,
        "mlp (swiglu)": 5 * b * f / tp,
    }
    if lay.recompute == "none":
        terms["attention lse"] = 4 * heads / tp
    return terms


def layer_activation_bytes(arch: ModelArch, lay: Layout, b: int) -> float:
    return sum(layer_activation_terms(arch, lay, b).values())


def in_flight(lay: Layout, pp_rank: int, m: int) -> float:
    """Micro-batches whose activations stage `pp_rank` holds at its peak, in units of the
    rank's full layer stack (chunk-micro-batches / vpp with interleaving)."""
    if lay.pp == 1:
        return 1.0
    if lay.vpp == 1:
        return float(min(lay.pp - pp_rank, m))
    warmup = 2 * (lay.pp - pp_rank - 1) + (lay.vpp - 1) * lay.pp
    return min(warmup + 1, m * lay.vpp) / lay.vpp


# ---------------------------------------------------------------------------- per-rank plan


@dataclass
class RankMemory:
    """One pipeline stage's per-GPU memory, by term (bytes)."""

    pp_rank: int
    params: int
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def largest(self) -> str:
        return max(self.terms, key=lambda k: self.terms[k])


def _static(params: int, lay: Layout, b: int, prefix: str = "") -> dict[str, float]:
    opt = (12 if b == 2 else 8) * params / (lay.dp if lay.distributed_optimizer else 1)
    return {
        f"{prefix}weights": params * b,
        f"{prefix}grads (fp32)": params * 4.0,
        f"{prefix}optimizer": opt,
    }


def _loss_terms(arch: ModelArch, lay: Layout, wl: Workload) -> tuple[dict, float]:
    """(saved tensors of the last stage's loss for one micro-batch, transient peak)."""
    n, h, b, tp = wl.micro_batch_tokens, arch.hidden_size, wl.b, lay.tp
    spd = tp if lay.sp else 1
    vp = arch.vocab_size // tp
    ws = min(kernel_workspace_elems(), n * vp)
    gathered = n * h * b if lay.sp else 0  # SP: the kernel all-gathers the hidden rows
    if wl.stage == "sft":  # linear_cross_entropy: grads formed in forward
        saved = {"loss: grad_hidden + grad_W": n * h * b / spd + vp * h * b}
        return saved, ws * (4 + b) + gathered + n * h * b
    if wl.stage == "rm":
        return {"score head input": n * h * b / spd}, 0.0
    saved = {"loss: hidden + lse, mu": n * h * b / spd + 8 * n}
    return saved, ws * (4 + b) + gathered + n * h * 4 + vp * h * b


def rank_memory(arch: ModelArch, lay: Layout, wl: Workload, pp_rank: int) -> RankMemory:
    """Peak memory of one GPU of pipeline stage `pp_rank` (TP and DP ranks are symmetric)."""
    b, n, h = wl.b, wl.micro_batch_tokens, arch.hidden_size
    spd = lay.tp if lay.sp else 1
    head = "score" if wl.stage == "rm" else "lm"
    parts = stage_params(arch, lay, pp_rank, head, wl.num_labels)
    params = sum(parts.values())
    if wl.lora_rank:  # frozen base (no grads, no optimizer state), adapters (+ a score head)
        r = RankMemory(pp_rank, params, {"weights (frozen base)": params * b})
        trained = parts.get("score_head", 0) + lora_params(arch, lay, pp_rank, wl.lora_rank,
                                                            wl.lora_targets)  # fmt: skip
        r.terms.update(_static(trained, lay, b, prefix="lora "))
    else:
        r = RankMemory(pp_rank, params, _static(params, lay, b))
    fl = in_flight(lay, pp_rank, wl.microbatches)
    per_layer = layer_activation_bytes(arch, lay, b)
    layers = arch.num_layers // lay.pp
    r.terms["activations"] = fl * layers * per_layer * n
    if wl.lora_rank:  # each adapter keeps u = A x [tokens, r] for B's grad (x is the layer's)
        n_targets = len([t for t in wl.lora_targets if t != "lm_head"])
        r.terms["lora activations (A x)"] = fl * layers * n_targets * wl.lora_rank * b * n
    if pp_rank == 0:
        r.terms["embedding ids"] = math.ceil(fl) * 8 * n
    if pp_rank > 0:
        r.terms["p2p input"] = math.ceil(fl) * n * h * b / spd
    if pp_rank < lay.pp - 1:
        r.terms["p2p output"] = math.ceil(fl) * n * h * b / spd
    transient = layer_activation_bytes(arch, replace(lay, recompute="none"), b) * n
    if pp_rank == lay.pp - 1:
        norm = (4 * h + 4 + b * h) * n / spd
        saved, kernel = _loss_terms(arch, lay, wl)
        r.terms["final norm"] = norm
        r.terms.update(saved)
        if wl.lora_rank and "lm_head" in wl.lora_targets and head == "lm":
            r.terms["lora: lm head W + s B A"] = arch.vocab_size // lay.tp * h * b
        transient = max(transient, kernel)
    r.terms["transient (bwd layer / loss kernel)"] = transient
    if wl.stage == "rlvr":
        _rl_terms(arch, lay, wl, pp_rank, r)
    r.terms["reserve"] = wl.reserve_gib * GiB
    return r


def kv_cache_bytes(arch: ModelArch, lay: Layout, wl: Workload) -> float:
    """Generation KV cache of one rank: rows x length x layers x kv heads/tp x d x 2 (K, V)."""
    layers = arch.num_layers // lay.pp
    kv_heads = max(1, arch.num_kv_heads // lay.tp)
    return wl.rollout_batch * wl.rollout_len * layers * kv_heads * arch.head_dim * 2 * wl.b


def _rl_terms(arch: ModelArch, lay: Layout, wl: Workload, pp_rank: int, r: RankMemory) -> None:
    """RLVR: a frozen reference (weights only) and a critic (weights, grads, optimizer, a
    score head) on the same layout; generation's KV cache replaces training activations
    (the two phases do not overlap), so only the excess of the cache counts. With LoRA the
    reference is the policy's base with the adapters off (no copy); with critic.lora the
    critic is its own frozen base (weights only) + adapters and its score head trained."""
    if not wl.lora_rank:
        ref = sum(stage_params(arch, lay, pp_rank).values())
        r.terms["reference weights"] = ref * wl.b
    if wl.critic:
        parts = stage_params(arch, lay, pp_rank, "score", 1)
        critic = sum(parts.values())
        if wl.critic_lora_rank:
            r.terms["critic weights (frozen base)"] = critic * wl.b
            targets = tuple(t for t in wl.critic_lora_targets if t != "lm_head")
            trained = parts.get("score_head", 0) + lora_params(arch, lay, pp_rank,
                                                                wl.critic_lora_rank, targets)  # fmt: skip
            r.terms.update(_static(trained, lay, wl.b, prefix="critic lora "))
        else:
            r.terms.update(_static(critic, lay, wl.b, prefix="critic "))
    if not wl.generates:  # async: the generation group holds the cache
        return
    train_act = sum(v for k, v in r.terms.items() if k.startswith(("activations", "p2p", "loss")))
    kv = kv_cache_bytes(arch, lay, wl)
    r.terms["kv cache (beyond train activations)"] = max(0.0, kv - train_act)


def generation_memory(arch: ModelArch, lay: Layout, wl: Workload) -> list[RankMemory]:
    """RLVR's generation group (rlvr.mode async), per pipeline stage of its layout: the
    policy's weights, frozen, in the training precision (`stage_params` x b; with LoRA the
    base and the adapters), the KV cache of wl.rollout_batch sequences of wl.rollout_len
    (prompt + response) tokens (`kv_cache_bytes`), and the reserve. No gradients, optimizer
    state, reference, critic or training activations: the group only samples."""
    arch.check_layout(lay.tp, lay.pp, lay.vpp)
    out = []
    for p in range(lay.pp):
        params = sum(stage_params(arch, lay, p).values())
        r = RankMemory(p, params, {"weights (frozen policy)": params * wl.b})
        if wl.lora_rank:
            r.terms["lora adapters"] = lora_params(arch, lay, p, wl.lora_rank,
                                                   wl.lora_targets) * wl.b  # fmt: skip
        r.terms["kv cache"] = kv_cache_bytes(arch, lay, wl)
        r.terms["reserve"] = wl.reserve_gib * GiB
        out.append(r)
    return out


def plan(arch: ModelArch, lay: Layout, wl: Workload) -> list[RankMemory]:
    """Per pipeline stage memory (every TP/DP rank of a stage holds the same)."""
    arch.check_layout(lay.tp, lay.pp, lay.vpp)
    return [rank_memory(arch, lay, wl, p) for p in range(lay.pp)]


# ------------------------------------------------------------------------------- step time


def flops_per_token(arch: ModelArch, wl: Workload, recompute: str = "none") -> tuple[float, float]:
    """(model FLOPs per trained token, hardware FLOPs incl. recompute and a DPO reference
    forward). 6N + 12 L h S (PaLM), N without the input embedding lookup."""
    from nova_engine.train.metrics import flops_per_token as palm

    n = arch.num_params - arch.vocab_size * arch.hidden_size
    if arch.tie_word_embeddings:
        n += arch.vocab_size * arch.hidden_size  # the LM head matmul still counts
    model = palm(n, arch.num_layers, arch.hidden_size, wl.mean_doc_len)
    attn_fwd = 4 * arch.num_layers * arch.hidden_size * wl.mean_doc_len  # QK^T, AV forward
    hw = model
    if recompute == "full":
        hw += 2 * n + attn_fwd
    elif recompute == "selective":
        hw += attn_fwd
    if wl.lora_rank:  # a frozen base computes no weight gradients (adapters: negligible)
        hw -= 2 * n
    if wl.stage == "dpo":
        hw += 2 * n + attn_fwd  # the reference pass (cached once per sample)
    return model, hw


@dataclass(frozen=True)
class StepTime:
    seconds: float
    tokens_per_s_gpu: float
    mfu: float
    bubble: float


def step_time(
    arch: ModelArch,
    lay: Layout,
    wl: Workload,
    tokens_per_step: float,
    peak: float = H100_BF16_PEAK,
    efficiency: float = DEFAULT_EFFICIENCY,
) -> StepTime:
    """Projected optimizer-step time of `tokens_per_step` tokens (all DP ranks)."""
    model, hw = flops_per_token(arch, wl, lay.recompute)
    bubble = (lay.pp - 1) / (wl.microbatches * lay.vpp)
    secs = tokens_per_step * hw / (lay.world * peak * efficiency) * (1 + bubble)
    tps = tokens_per_step / secs / lay.world
    return StepTime(secs, tps, tps * model / peak, bubble)
