"""Typed configuration schema: every knob of every step, as frozen dataclasses.

YAML experiment files and `key=value` overrides are merged onto these defaults by `config/io.py`
(the only OmegaConf importer). This module is stdlib-only so anything may import it. Each field
carries its documentation in the string right under it; `confu config` prints those strings as
YAML comments. Defaults describe a small valid run on the embedded SmolLM2 target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from confu_lightning.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"`{key}` {message}")


@dataclass(frozen=True)
class TargetConfig:
    """The frozen target (verifier) model."""

    name: str = "smollm2-135m"
    """Built-in name (`smollm2-135m`, `tiny-random-llama`), a Hugging Face model id such as
    `meta-llama/Llama-3.1-8B-Instruct`, or a local checkpoint directory."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id; ignored for built-ins and local paths."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and activation dtype of the target."""
    device: str = "cpu"
    """Torch device the target runs on (`cpu`, `cuda`, `cuda:1`, ...)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel. Both accept the additive float 4D masks used for trees and contemplate tokens."""
    aux_layers: list[int] | None = None
    """Hidden-state indices fused by the draft, in the HF `output_hidden_states` convention
    (0 = embeddings, i = output of decoder layer i, L = post-norm). None means [2, L//2, L-3]."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (needed by a few architectures)."""
    prompt: str = "In two sentences, what is speculative decoding?"
    """Prompt that `confu target` answers through the chat template, as a smoke test."""
    max_new_tokens: int = 48
    """Tokens generated (greedily) for `target.prompt` by `confu target`."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "target.name", "must not be empty")
        _require(self.max_new_tokens >= 1, "target.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.aux_layers is not None:
            _require(len(self.aux_layers) == 3, "target.aux_layers",
                     f"must list exactly 3 layer indices (EAGLE-3 fuses low/mid/high), got {list(self.aux_layers)}")


@dataclass(frozen=True)
class DataSourceConfig:
    """One conversation source; several are mixed in order."""

    path: str = "builtin"
    """`builtin`, a hub dataset id (e.g. `HuggingFaceH4/ultrachat_200k`) or a local JSON / JSONL file."""
    format: Literal["auto", "sharegpt", "ultrachat", "messages"] = "auto"
    """Record layout; `auto` detects it per record (`conversations` → ShareGPT, else `messages`)."""
    split: str = "train"
    """Dataset split for hub sources (`train_sft` for UltraChat)."""
    limit: int | None = None
    """Keep at most this many records from this source (None: all)."""


@dataclass(frozen=True)
class DataConfig:
    """Conversations, tokenisation and response regeneration."""

    sources: list[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig()])
    """Conversation sources, mixed in order and de-duplicated by id."""
    max_seq_len: int = 1024
    """Longest tokenised conversation kept, in tokens."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with a conversation longer than `data.max_seq_len`."""
    regenerate: bool = True
    """Replace assistant turns with the target's own answers (EAGLE-3 practice)."""
    gen_max_new_tokens: int = 256
    """Longest regenerated answer per user turn, in tokens."""
    gen_temperature: float = 0.0
    """Sampling temperature for regeneration; 0 is greedy."""
    gen_top_p: float = 1.0
    """Nucleus sampling threshold for regeneration."""
    gen_batch_size: int = 16
    """Conversations regenerated per batched `generate` call."""
    output_dir: str = "runs/data"
    """Where `confu prepare` writes the regenerated conversations."""

    def __post_init__(self) -> None:
        _require(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        _require(self.gen_temperature >= 0, "data.gen_temperature", f"must be >= 0, got {self.gen_temperature}")
        _require(0 < self.gen_top_p <= 1, "data.gen_top_p", f"must be in (0, 1], got {self.gen_top_p}")


@dataclass(frozen=True)
class CacheConfig:
    """Hidden-state cache written by `confu cache` (DESIGN.md §5)."""

    dir: str = "runs/cache"
    """Directory holding `manifest.json` and the safetensors shards."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of `aux_hidden` and `last_hidden`."""
    shard_tokens: int = 262144
    """Target number of tokens per shard."""
    batch_size: int = 8
    """Conversations per target forward while caching."""


@dataclass(frozen=True)
class DraftConfig:
    """The draft model (EAGLE-3 or ConFu)."""

    kind: Literal["eagle3", "confu"] = "eagle3"
    """Draft architecture."""
    n_layers: int = 1
    """Decoder layers in the draft."""
    vocab_size: int = 32000
    """Draft vocabulary size (top tokens by frequency); clipped to the target vocabulary."""
    init_from: str | None = None
    """Checkpoint to initialise from (ConFu starts from a trained EAGLE-3 draft)."""

    def __post_init__(self) -> None:
        _require(self.n_layers >= 1, "draft.n_layers", f"must be >= 1, got {self.n_layers}")
        _require(self.vocab_size >= 2, "draft.vocab_size", f"must be >= 2, got {self.vocab_size}")


@dataclass(frozen=True)
class ContemplateConfig:
    """ConFu contemplate tokens, soft prompts and MoE (DESIGN.md §6, ConFu §2)."""

    n_soft_prompts: int = 16
    """Trainable soft-prompt embeddings P prepended (invisibly) to the target's context."""
    length: int = 1
    """Contemplate tokens per anchor / tree node (the paper's contemplate length)."""
    n_experts: int = 8
    """Experts E of MoE-con and MoE-f; 1 is the static contemplate token."""
    top_k: int = 2
    """Experts mixed per token."""
    n_anchors: int = 32
    """Anchor tokens sampled per training sequence."""
    replication: int = 7
    """Draft positions that see one anchor's future prediction (future prediction replication)."""
    lr_scale: float = 10.0
    """Learning-rate multiplier for the new ConFu parameters relative to `optim.lr`."""

    def __post_init__(self) -> None:
        _require(self.n_experts >= 1, "contemplate.n_experts", f"must be >= 1, got {self.n_experts}")
        _require(1 <= self.top_k <= self.n_experts, "contemplate.top_k",
                 f"must be in [1, contemplate.n_experts={self.n_experts}], got {self.top_k}")
        _require(self.length >= 1, "contemplate.length", f"must be >= 1, got {self.length}")
        _require(self.n_soft_prompts >= 0, "contemplate.n_soft_prompts", f"must be >= 0, got {self.n_soft_prompts}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up steps before cosine decay."""
    grad_clip: float = 0.5
    """Gradient-norm clipping threshold (0 disables)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2, "optim.betas", f"must have two values, got {list(self.betas)}")


@dataclass(frozen=True)
class TrainConfig:
    """Lightning Trainer settings and the training-time-test unroll."""

    mode: Literal["offline", "online"] = "offline"
    """`offline`: features from the hidden-state cache (`cache.dir`); `online`: the target runs in
    the loop on the prepared conversations (`data.output_dir`), as ConFu needs."""
    ttt_steps: int = 7
    """Training-time-test unroll depth K."""
    step_weight: float = 0.8
    """Loss weight gamma^k of unroll step k."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_tokens: int = 4096
    """Token budget per batch (padded rows x longest row, or the packed row length)."""
    batching: Literal["bucket", "pack"] = "bucket"
    """`bucket`: pad samples of similar length together; `pack`: concatenate samples into one row."""
    num_workers: int = 0
    """DataLoader worker processes."""
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    """Lightning precision plugin."""
    accelerator: str = "auto"
    """Lightning accelerator (`cpu`, `gpu`, `auto`)."""
    devices: int = 1
    """Devices per node."""
    num_nodes: int = 1
    """Nodes in a multi-node run."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Lightning distribution strategy."""
    val_fraction: float = 0.05
    """Fraction of samples held out for validation."""
    val_every_steps: int = 200
    """Validation interval in optimizer steps; the best checkpoint is chosen by `val/sim_tau`."""
    ckpt_every_steps: int = 100
    """Interval in optimizer steps between `last.ckpt` saves (a killed run resumes from it)."""
    log_every_steps: int = 10
    """Interval in optimizer steps between metric logs."""
    output_dir: str = "runs/train"
    """Where checkpoints and the resolved config are written."""
    resume: bool = True
    """Resume from `checkpoints/last.ckpt` in `train.output_dir` when present."""
    force_resume: bool = False
    """Resume even though the config differs from the one the checkpoint was trained with."""
    record_data_order: bool = False
    """Write `data_order.rank<r>.jsonl` (per step: a hash of every sample in the batch; at the end a
    checksum of the weights), to audit DDP sharding and reproducibility."""

    def __post_init__(self) -> None:
        _require(self.ttt_steps >= 1, "train.ttt_steps", f"must be >= 1, got {self.ttt_steps}")
        _require(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _require(0 <= self.val_fraction < 1, "train.val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _require(self.batch_tokens >= 8, "train.batch_tokens", f"must be >= 8, got {self.batch_tokens}")
        for key in ("val_every_steps", "ckpt_every_steps", "log_every_steps", "devices", "num_nodes"):
            _require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class EvalConfig:
    """Speculative decoding evaluation against the autoregressive baseline (`confu eval`)."""

    prompts: str = "builtin"
    """`builtin` (66 prompts shipped in the package), `spec_bench` (downloads SpecBench's
    question.jsonl), or a local SpecBench / MT-bench question JSONL or ShareGPT file."""
    max_prompts: int | None = None
    """Evaluate only the first N prompts (None: all)."""
    methods: list[str] = field(default_factory=lambda: ["ar", "eagle3"])
    """Decoding methods compared; `ar` (the speed-up baseline) must be among them."""
    draft: str | None = None
    """Trained draft directory (native, EAGLE or speculators layout) of method `eagle3`; None means
    `<train.output_dir>/draft`."""
    drafts: dict[str, str] = field(default_factory=dict)
    """More drafts compared in the same run: method name -> draft directory, e.g.
    `{eagle3_long: runs/long/train/draft}`; list each name in `eval.methods` too."""
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    """Sampling temperatures evaluated (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold at temperature > 0."""
    max_new_tokens: int = 128
    """Tokens generated per turn."""
    system_prompt: str | None = None
    """System prompt placed before every conversation (None: the chat template's default)."""
    tree: Literal["chain", "dynamic"] = "dynamic"
    """Draft shape: a chain or an EAGLE-2 dynamic tree."""
    depth: int = 6
    """Longest drafted path per round."""
    top_k: int = 8
    """Children expanded per tree level (dynamic tree)."""
    total_tokens: int = 32
    """Tree nodes verified per round, root included (dynamic tree)."""
    output_dir: str = "runs/eval"
    """Where `results.json`, plots and the resolved config are written."""

    def __post_init__(self) -> None:
        _require(self.depth >= 1, "eval.depth", f"must be >= 1, got {self.depth}")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(all(t >= 0 for t in self.temperatures), "eval.temperatures", f"must be >= 0, got {self.temperatures}")
        _require("ar" not in self.drafts, "eval.drafts", "`ar` is the autoregressive baseline, not a draft name")


@dataclass(frozen=True)
class ExportConfig:
    """Export of a trained draft for serving engines (`confu export`)."""

    source: str | None = None
    """Trained draft to export: a native draft directory or a Lightning `.ckpt`; None means
    `<train.output_dir>/draft` (written at the end of `confu train` from the best checkpoint)."""
    format: Literal["eagle", "speculators", "native"] = "eagle"
    """`eagle`: EAGLE / SGLang layout (`LlamaForCausalLMEagle3`); `speculators`: vLLM / speculators
    layout (`Eagle3Speculator`); `native`: this project's own draft checkpoint."""
    output_dir: str = "runs/export"
    """Directory the exported draft is written to (replaced atomically)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Weight dtype of the exported draft."""
    speculative_tokens: int = 3
    """`speculative_tokens` recorded in the speculators config (vLLM's default proposal length)."""


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment tracking."""

    enabled: bool = True
    """Log runs to MLflow."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; the default is a SQLite store in the working directory."""
    experiment: str = "confu_lightning"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (None: derived from the step and the experiment file)."""


@dataclass(frozen=True)
class SweepConfig:
    """Ablation sweep: one base experiment, a grid of overrides."""

    name: str = "sweep"
    """Sweep name; becomes the parent MLflow run."""
    grid: dict[str, list[str]] = field(default_factory=dict)
    """Config key -> values to try; the cartesian product is run."""
    metric: str = "eval/tau"
    """Metric compared across runs."""
    direction: Literal["maximize", "minimize"] = "maximize"
    """Whether larger `sweep.metric` is better."""


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment: one section per step."""

    seed: int = 0
    """Global random seed."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The frozen target model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Conversation data and regeneration."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Hidden-state cache."""
    draft: DraftConfig = field(default_factory=DraftConfig)
    """The draft model."""
    contemplate: ContemplateConfig = field(default_factory=ContemplateConfig)
    """ConFu contemplate tokens, soft prompts and MoE."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Draft export for serving engines."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Ablation sweep (used by `confu sweep`)."""
