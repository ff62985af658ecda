"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every setting is declared here once, with a comment; the YAML files under conf/ only choose values.
Hydra checks names and types while composing; `validate` then builds the dataclasses, which runs
the cross-field checks in each `__post_init__`, before any model or data set is built.
"""
from __future__ import annotations

import re
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline import demo
from pipeline.errors import PipelineError

DATA_KINDS = ("demo", "file", "hub")
LOGGING_BACKENDS = ("wandb", "none")
RESUME_MODES = ("auto", "never")
# The pretraining optimizers (pipeline/optim.py builds them).
OPTIMIZERS = ("adamw", "muon")


@dataclass
class RegistryConfig:
    # Directory holding the registry index, checkpoints, trainer checkpoints, logs and reports.
    root: str = "${oc.env:PIPELINE_HOME,runs}"
    # Keep the trainer's intermediate checkpoints (optimizer state) after a run completes.
    keep_trainer_checkpoints: bool = False
    # Also log each complete checkpoint to wandb as a model artifact named by its entry id, whose lineage
    # follows the registry's parents (with logging=wandb; offline runs upload on `wandb sync`).
    wandb_artifacts: bool = False


@dataclass
class ModelConfig:
    # Hub id or local Hugging Face directory to start from; null builds a fresh Llama from the fields below.
    # Every model preset sets it (null or a name), so that model=hub without a name is caught as missing.
    name_or_path: Optional[str] = MISSING
    # Llama architecture of a model built from scratch (ignored when name_or_path is set).
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    # Key/value heads (grouped-query attention); equal to num_heads for plain multi-head attention.
    num_kv_heads: int = 4
    intermediate_size: int = 688
    # Share the input embedding with the output projection (saves parameters on small models).
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    # Allow a hub model (name_or_path) to run code from its repository. Off unless you trust the repository.
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.name_or_path is None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                             f"model.num_heads ({self.num_heads})")
        if self.name_or_path is None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be divisible by "
                             f"model.num_kv_heads ({self.num_kv_heads})")


@dataclass
class TokenizerConfig:
    # Vocabulary size of the byte-level BPE trained on the corpus (models from scratch only).
    vocab_size: int = 4096
    # Documents used to train the BPE (a sample of the corpus is enough).
    train_documents: int = 20000
    # Text the later stages will show the model, added to the BPE's training sample so that their words are
    # tokens of their own: local files (.txt/.jsonl/.json/.parquet; every text field and message of a row),
    # data presets by name (e.g. ultrachat: conf/data/<name>.yaml), or "demo" (the demo's instructions and
    # answers). null: "demo" when the corpus is the demo's, nothing otherwise; [] for nothing.
    extra_text: Optional[List[str]] = None
    # Cap on the extra texts used (the first ones of each source, in turn).
    extra_documents: int = 10000
    # A saved tokenizer to pretrain with instead of training one: a registry reference (pretrain:latest, an entry
    # id, which becomes the entry's parent), a directory or a hub id. Models pretrained on other seeds then read
    # text alike, as an ensemble of their reward models needs (reward.ensemble_init). null: train the BPE.
    path: Optional[str] = None


@dataclass
class DataSource:
    """Where a stage's data comes from: what every stage's data section holds."""
    # demo (generated), file (.txt/.jsonl/.parquet), hub (a dataset id).
    kind: str = "demo"
    # Local file for kind=file, dataset id for kind=hub (every data preset sets it, null for the demo).
    path: Optional[str] = MISSING
    # Hub dataset configuration name and split.
    hub_config: Optional[str] = None
    split: str = "train"
    # How a .txt file is cut into rows: "paragraph" (blank-line separated) or "line".
    sample_by: str = "paragraph"
    # Cap on rows read (null = all); useful for a quick look at a large hub data set.
    max_rows: Optional[int] = None
    # Share of rows held out for evaluation (at least one is always held out).
    eval_fraction: float = 0.02

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if self.kind != "demo" and not self.path:
            raise ValueError(f"data.kind={self.kind} needs data.path (a local file or a hub dataset id)")
        if self.sample_by not in ("paragraph", "line"):
            raise ValueError(f"data.sample_by must be 'paragraph' or 'line', got {self.sample_by!r}")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ValueError(f"data.eval_fraction must be in (0, 0.5), got {self.eval_fraction}")


@dataclass
class CorpusData(DataSource):
    """Pretraining's text corpus, packed into blocks."""
    # Column holding the text (.jsonl/.parquet files and hub datasets).
    text_field: str = "text"
    # Stories in the demo corpus.
    num_documents: int = 20000
    # Tokens per sequence; documents are packed end to end into blocks of this size.
    block_size: int = 256
    # Cap on held-out blocks, to keep evaluation quick.
    max_eval_blocks: int = 200


@dataclass
class ExampleData(DataSource):
    """Rows of a stage after pretraining, in TRL's formats: demonstrations, preference pairs or prompts."""
    # Column renames applied after loading, to reach TRL's formats: {instruction: prompt, output: completion}.
    rename: Dict[str, str] = field(default_factory=dict)
    # Rows with a missing field, an unknown role or an empty response stop the run (false), or are
    # skipped and counted (true).
    skip_bad_rows: bool = False
    # Rows the demo generates (demonstrations, pairs or prompts).
    num_examples: int = 8000


@dataclass
class PromptData(ExampleData):
    """The prompts an online method samples responses to (PPO, GRPO, RLOO); its held-out prompts are eval's."""


@dataclass
class TrainingExamples(ExampleData):
    """Demonstrations or preference pairs: responses to learn from, held out and capped in length."""
    # The demo's flaw classes and their weights among flawed demonstrations and rejected responses; a class is
    # drawn among those the task can have (a sentiment label names no element, so it has no swap; only labels
    # have wrong_label; only labels and summaries have format). docs/demo.md describes each class.
    flaw_shares: Dict[str, float] = field(default_factory=lambda: dict(demo.FLAW_SHARES))
    # Cap on held-out rows.
    max_eval_examples: int = 200
    # Longest tokenized example (prompt + response); longer ones are truncated or left out (the log says which).
    max_length: int = 512

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.flaw_shares) - set(demo.FLAWS))
        if unknown:
            raise ValueError(f"data.flaw_shares: unknown flaw class(es) {unknown}; the classes are {list(demo.FLAWS)}")
        if any(v < 0 for v in self.flaw_shares.values()) or not any(v > 0 for v in self.flaw_shares.values()):
            raise ValueError(f"data.flaw_shares must be non-negative with one positive, got {dict(self.flaw_shares)}")


@dataclass
class PairData(TrainingExamples):
    """Preference pairs (the reward model, DPO)."""
    # The demo's swaps replace only these elements (person, animal, colour, obj, place, ending); a task naming none
    # of them gets its other flaw classes. []: any element the task's response names. What a reward-ensemble
    # member's own data can focus on (reward.ensemble_data).
    swap_elements: List[str] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        elements = {e for task_elements in demo.SWAP_ELEMENTS.values() for e in task_elements}
        unknown = sorted(set(self.swap_elements) - elements)
        if unknown:
            raise ValueError(f"data.swap_elements: unknown element(s) {unknown}; a swap can replace "
                             f"{sorted(elements)}")


@dataclass
class DemonstrationData(TrainingExamples):
    """SFT's demonstrations."""
    # Share of demo demonstrations that are flawed, as real ones are: the SFT model learns the flaws, and RLHF
    # has something to remove.
    flawed_share: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.flawed_share <= 1.0:
            raise ValueError(f"data.flawed_share must be in [0, 1], got {self.flawed_share}")


@dataclass
class TrainerConfig:
    """The Trainer's settings every stage takes (pipeline/trainer.py turns them into TrainingArguments)."""
    # Optimizer steps to train for (PPO: updates).
    max_steps: int = 1000
    # Peak learning rate, reached after warmup and decayed with the scheduler.
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    # The scheduler's own settings, e.g. {num_decay_steps: 40} for warmup_stable_decay (warm-up, a constant rate,
    # then a decay over the last num_decay_steps); those the chosen scheduler does not take are left out.
    lr_scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # Sequences per device per step; the global batch is this x processes x accumulation.
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    # Mixed precision: "auto" (bf16 autocast where bf16 matmuls are native and pay: a GPU with bf16, a CPU with
    # AMX tiles, and for pretraining a CPU with AVX-512 BF16; fp32 elsewhere: pipeline/trainer.py,
    # resolved_precision; PPO always fp32), "no", "bf16", "fp16". Weights stay fp32; gold-score, accuracy and
    # reward evaluations run in fp32. `make bench` measures both.
    mixed_precision: str = "auto"
    # Steps between log lines.
    logging_steps: int = 25
    # Data-loading worker processes (0 loads in the training process).
    dataloader_num_workers: int = 0
    # Recompute activations in the backward pass: less memory for about a third more compute. Off by
    # default (TRL's trainers turn it on); turn it on for a large model on a small GPU.
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"trainer.max_steps must be positive, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"trainer.learning_rate must be positive, got {self.learning_rate}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"trainer.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass
class CheckpointingTrainerConfig(TrainerConfig):
    """A Trainer that writes checkpoints a rerun resumes from (every stage but PPO, which saves every
    ppo.save_every updates)."""
    # Steps between trainer checkpoints (what a rerun resumes from).
    save_steps: int = 250
    # Trainer checkpoints kept while training.
    save_total_limit: int = 2


@dataclass
class LengthGroupedTrainerConfig(CheckpointingTrainerConfig):
    """The stages whose examples vary in length and whose sampler can group them (SFT, the reward model)."""
    # Batch sequences (or preference pairs) of similar length together: far less padding when lengths vary.
    group_by_length: bool = False


@dataclass
class LoggingConfig:
    # Experiment tracker: wandb (online with WANDB_API_KEY, offline otherwise) or none.
    backend: str = "wandb"
    # wandb project the runs go to.
    project: str = "llm-pipeline"

    def __post_init__(self):
        if self.backend not in LOGGING_BACKENDS:
            raise ValueError(f"logging.backend must be one of {LOGGING_BACKENDS}, got {self.backend!r}")


@dataclass
class PeftConfig:
    # "none" trains every weight; "lora" trains low-rank adapters (merged into the saved model).
    method: str = "none"
    # LoRA rank, scaling (alpha / r) and dropout.
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Modules that get adapters; "all-linear" is every linear layer but the output head.
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self):
        if self.method not in ("none", "lora"):
            raise ValueError(f"peft.method must be none or lora, got {self.method!r}")


@dataclass
class GenerationEvalConfig:
    # Held-out prompts generated for and scored by the gold judge (demo) after training, and for the
    # starting model before it; on a prompt file, the most held out (the online methods and DPO hold out at least
    # 200, or a third of a small file, whichever is fewer).
    num_prompts: int = 200
    # Responses sampled to each held-out prompt, by the tuned model and by its start: a small prompt file still gives
    # a usable interval (the gains are bootstrapped over prompts, each the mean of its k responses).
    samples_per_prompt: int = 1
    max_new_tokens: int = 96
    # Sampling temperature (0 means greedy decoding). 1.0, as ppo.temperature, so that the SFT model's figures and
    # the online policies' are measured on responses sampled alike, from the model's own distribution: a model's
    # flaws show in what it samples, where greedy decoding (or TRL's 0.7) hides most of them.
    temperature: float = 1.0
    # Seed of the sampling noise, the same for a model and its start.
    seed: int = 0
    batch_size: int = 50

    def __post_init__(self):
        if self.samples_per_prompt < 1:
            raise ValueError(f"eval.samples_per_prompt must be at least 1, got {self.samples_per_prompt}")


@dataclass
class SavedGenerationConfig:
    """The generation settings saved with every checkpoint (its generation_config.json): what `generate` does
    with the model unless told otherwise. The stages' own evaluations set theirs (eval, ppo.temperature)."""
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 0.7


@dataclass
class StageConfig:
    """The keys every stage understands (so one ARGS can be passed to every stage)."""
    # Seed for data generation, initialisation and data order.
    seed: int = 0
    # "auto": rerunning the same command resumes its unfinished run; "never": always start afresh.
    resume: str = "auto"
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume must be one of {RESUME_MODES}, got {self.resume!r}")


@dataclass
class PretrainStageConfig(StageConfig):
    # The model: a Llama built from the architecture given here, or a hub model / local directory to go on
    # pretraining (model.name_or_path).
    model: ModelConfig = field(default_factory=ModelConfig)
    # The BPE trained for a model built from scratch.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: CorpusData = field(default_factory=CorpusData)
    trainer: CheckpointingTrainerConfig = field(default_factory=CheckpointingTrainerConfig)
    # "adamw" (fused AdamW, the Trainer's default) or "muon": torch.optim.Muon on the hidden layers' weight
    # matrices and AdamW on the rest, at trainer.learning_rate (pipeline/optim.py). A pretraining key: the
    # fine-tuning stages train with AdamW.
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.tokenizer.path and self.model.name_or_path:
            raise ValueError("tokenizer.path is for a model built from scratch: model.name_or_path brings its own "
                             "tokenizer; set one of them")


@dataclass
class FinetuneStageConfig(StageConfig):
    """What every stage after pretraining shares: the checkpoint it starts from, and how it is trained."""
    # The model to start from: a registry reference (pretrain, sft:best, an entry id), a local Hugging Face
    # directory, or a hub id. Each stage sets its own default.
    init_from: str = MISSING
    # Allow a hub model to run code from its repository. Off unless you trust the repository.
    trust_remote_code: bool = False
    peft: PeftConfig = field(default_factory=PeftConfig)


@dataclass
class GeneratingStageConfig(FinetuneStageConfig):
    """A stage that ends by sampling its model's and its start's responses to held-out prompts."""
    # Evaluation by generation on held-out prompts, for the tuned model and its start.
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


@dataclass
class SFTStageConfig(GeneratingStageConfig):
    init_from: str = "pretrain:latest"
    data: DemonstrationData = field(default_factory=DemonstrationData)
    trainer: LengthGroupedTrainerConfig = field(default_factory=LengthGroupedTrainerConfig)
    # How a batch of demonstrations is laid out: "padded" (each padded to the batch's longest),
    # "padding_free" (the batch flattened into one row, kept apart by position ids: no padding tokens, same
    # loss), or "auto": padding-free when the model's attention is a flash-attention kernel, which skips
    # the masked blocks; under SDPA or eager attention the flattened row costs attention over the whole
    # batch and is slower than padding (`make bench` measures both).
    batching: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.batching not in ("auto", "padded", "padding_free"):
            raise ValueError(f"batching must be auto, padded or padding_free, got {self.batching!r}")


ENSEMBLE_KINDS = ("models", "heads")


@dataclass
class RewardSettings:
    """One reward model, or an ensemble of them in one entry, scored as one: their mean and their disagreement."""
    # Members of the ensemble, each trained on its own bootstrap share of the pairs. 1: a single reward model.
    ensemble_size: int = 1
    # models: separately trained reward models (own seed, head, data share and order), each for as many passes over
    # its share as a single model makes over all the pairs (so K members cost K x ensemble_subsample of one model),
    # scored side by side as one. heads: K score heads on one backbone, one forward pass for all, each trained on
    # its own share of every batch; they cost what one model does, but share the features, and with them the
    # blind spots: on the demo they disagree ten times less than separate models, least where the model is blind
    # (docs/results.md, "Reward ensembles").
    ensemble_kind: str = "models"
    # The share of the pairs a member trains on (heads: of each batch's pairs, drawn for each member): what keeps
    # the members apart where the data does not settle the answer. 1.0: every member sees every pair.
    ensemble_subsample: float = 0.5
    # One backbone per member (registry references, directories or hub ids), in place of init_from: members that
    # differ in pretraining, not only in their fine-tuning seed, as Eisenstein et al. ("Helping or Herding?") found
    # ensembles need. The backbones must share one tokenizer. []: every member starts from init_from.
    ensemble_init: list[str] = field(default_factory=list)
    # One data section per member, each overriding the stage's `data` for that member's training pairs: members that
    # differ in what they saw, so that their blind spots differ (a file or hub set each: [{path: a.jsonl},
    # {path: b.jsonl}]; on the demo, swaps of one element each: [{swap_elements: [person]}, ...]). Every member is
    # evaluated on the stage's held-out pairs. []: every member draws its share from the stage's pairs.
    ensemble_data: List[Dict[str, Any]] = field(default_factory=list)
    # Weight of TRL's centring term, coef * (r_chosen + r_rejected)^2 (Eisenstein et al., "Helping or Herding?",
    # eq. 2; they use 0.01): the Bradley-Terry loss leaves each prompt's score level free, so members may agree on
    # every preference yet score the same response far apart, which the disagreement on single responses (the
    # policy's rollouts) then reads as doubt. null: no term.
    center_rewards_coefficient: Optional[float] = None

    def __post_init__(self):
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"reward.center_rewards_coefficient must be >= 0 (or null), got "
                             f"{self.center_rewards_coefficient}")
        if self.ensemble_size < 1:
            raise ValueError(f"reward.ensemble_size must be at least 1, got {self.ensemble_size}")
        if self.ensemble_kind not in ENSEMBLE_KINDS:
            raise ValueError(f"reward.ensemble_kind must be one of {', '.join(ENSEMBLE_KINDS)}, got "
                             f"'{self.ensemble_kind}'")
        if not 0 < self.ensemble_subsample <= 1:
            raise ValueError(f"reward.ensemble_subsample must be in (0, 1], got {self.ensemble_subsample}")
        if self.ensemble_init and (len(self.ensemble_init) != self.ensemble_size or self.ensemble_kind != "models"):
            raise ValueError(f"reward.ensemble_init names one backbone per member of an ensemble of separate models: "
                             f"give {self.ensemble_size} with reward.ensemble_size={self.ensemble_size} and "
                             f"reward.ensemble_kind=models, got {len(self.ensemble_init)} with "
                             f"ensemble_kind={self.ensemble_kind}")
        if self.ensemble_data and (len(self.ensemble_data) != self.ensemble_size or self.ensemble_kind != "models"
                                   or self.ensemble_size < 2):
            raise ValueError(f"reward.ensemble_data gives one data section per member of an ensemble of separate "
                             f"models: give one per member with reward.ensemble_size=K (K > 1) and "
                             f"reward.ensemble_kind=models, got {len(self.ensemble_data)} with "
                             f"ensemble_size={self.ensemble_size}, ensemble_kind={self.ensemble_kind} (one model "
                             f"takes its data from the data section)")


@dataclass
class RewardStageConfig(FinetuneStageConfig):
    # The backbone of the reward model (the SFT model by default); a sequence-classification head with one
    # output per ensemble member is put on top.
    init_from: str = "sft:latest"
    data: PairData = field(default_factory=PairData)
    trainer: LengthGroupedTrainerConfig = field(default_factory=LengthGroupedTrainerConfig)
    reward: RewardSettings = field(default_factory=RewardSettings)
    # Warn when |correlation(score, response length)| on held-out responses exceeds this: a reward model
    # that just likes long (or short) answers.
    length_correlation_warning: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        for i in range(len(self.reward.ensemble_data)):
            self.member_data(i)  # each member's section must be a valid data section

    def member_data(self, i: int) -> PairData:
        """Member i's data section: the stage's, with reward.ensemble_data[i] over it (the stage's own without)."""
        if not self.reward.ensemble_data:
            return self.data
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(self.data), self.reward.ensemble_data[i]))
        except Exception as e:  # an unknown key or a bad value: name the member
            raise ValueError(f"reward.ensemble_data[{i}]: {str(e).splitlines()[0]}") from None


UNCERTAINTY_MODES = ("none", "mean_minus_std", "min")


@dataclass
class OnlineRLSettings:
    """What the online methods (PPO, GRPO, RLOO) share: the reward's scale, and the guards against
    over-optimisation."""
    # Reward-model scores are (score - score_mean) / score_std with the reward model's stored statistics, so that
    # the policy sees rewards of unit scale (and on the scale of the reward functions they are weighed with).
    normalize_rewards: bool = True
    # Stop when the policy's logged KL to the reference exceeds this (nats per response); null turns the guard
    # off. The stop is recorded in the entry.
    kl_budget: Optional[float] = 8.0
    # Track the gold judge's score on held-out demo prompts every this many updates (0 = never), the responses
    # sampled with the eval settings, as the final evaluation samples them (<stage>_history.json).
    gold_every: int = 8
    gold_prompts: int = 48
    # With a reward-model ensemble (reward.ensemble_size > 1), the reward the policy is trained on, from the
    # members' normalised scores: none (their mean), mean_minus_std (the mean less reward_uncertainty_coef times
    # their std: a conservative reward that pays less where the members disagree) or min (the lowest member's).
    reward_uncertainty: str = "none"
    reward_uncertainty_coef: float = 1.0
    # Warn when the ensemble's disagreement on the policy's rollouts (reward/ensemble_std) exceeds this many times
    # its value on the first update's rollouts, those of the start; null turns the warning off. With
    # disagreement_stop the stage also stops there, keeping the policy of that update. Recorded in the entry.
    disagreement_budget: Optional[float] = 1.5
    disagreement_stop: bool = False
    # Warn when the policy's KL to its start (nats per response, 8-update means) has grown past this many times its
    # value where the reward it is trained on last rose (by 0.05 of the normalised reward): the policy moving where
    # the reward model sees no gain, which on the demo came before gold fell (docs/results.md, "A warning that
    # reads the reward and the KL"). Needs no ensemble; null turns it off. With stall_stop the stage also stops
    # there, keeping the policy of that update. Recorded in the entry.
    stall_budget: Optional[float] = 1.5
    stall_stop: bool = False

    def __post_init__(self):
        if self.reward_uncertainty not in UNCERTAINTY_MODES:
            raise ValueError(f"reward_uncertainty must be one of {', '.join(UNCERTAINTY_MODES)}, got "
                             f"{self.reward_uncertainty!r}")
        if self.disagreement_budget is not None and self.disagreement_budget <= 0:
            raise ValueError(f"disagreement_budget must be positive (or null), got {self.disagreement_budget}")
        if self.stall_budget is not None and self.stall_budget <= 1:
            raise ValueError(f"stall_budget must be above 1 (a growth of the KL), or null, got {self.stall_budget}")


@dataclass
class PPOSettings(OnlineRLSettings):
    """The details that make PPO for RLHF work (see "The N Implementation Details of RLHF with PPO")."""
    # Tokens sampled per response; a response is truncated after its first eos (the stop token).
    response_length: int = 80
    # Sampling temperature, applied the same way when sampling and when computing log-probabilities; also the
    # temperature of the held-out evaluation of the policy and its start. 1.0 rather than TRL's 0.7: see
    # eval.temperature.
    temperature: float = 1.0
    # Per-token KL penalty to the frozen reference (the starting policy) and its estimator (k1 or k3).
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    # Subtracted from the score of a response that never emits eos.
    missing_eos_penalty: float = 1.0
    # PPO: epochs over each batch of rollouts, mini-batches per epoch, policy and value clipping, value loss weight.
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    # Generalized advantage estimation: discount and lambda.
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    # Rollout batch for generation and scoring forward passes.
    rollout_batch_size: int = 64
    # Updates between saves of what the next update depends on (weights, optimizer, RNG, the prompts' position,
    # the guards' histories) in Trainer checkpoints, which a rerun of the same command resumes from; 0: none. The
    # stage also saves when a guard stops it.
    save_every: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"ppo.kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature must be positive, got {self.temperature}")
        if self.save_every < 0:
            raise ValueError(f"ppo.save_every must be 0 (no saves) or positive, got {self.save_every}")


@dataclass
class PPOStageConfig(GeneratingStageConfig):
    # The policy (and frozen reference).
    init_from: str = "sft:latest"
    # The reward model, which also initialises the value model: same kinds of reference.
    reward_model: str = "reward:latest"
    data: PromptData = field(default_factory=PromptData)
    # Its checkpoints are set by ppo.save_every (in updates), the trainer section has none.
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)


@dataclass
class DPOSettings:
    """TRL's DPOTrainer settings the stage exposes (the loss, the pull towards the reference)."""
    # How far the policy may move from the reference: the implicit reward is beta x log(policy / reference); a
    # higher beta keeps the policy closer.
    beta: float = 0.1
    # TRL's DPO loss types: sigmoid (DPO), ipo, hinge, robust, apo_zero, sigmoid_norm, ...; several are combined
    # with loss_weights.
    loss_type: List[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[List[float]] = None
    # Label smoothing: the assumed share of flipped preference labels (robust and exo_pair losses).
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"dpo.loss_weights needs one weight per loss in dpo.loss_type {list(self.loss_type)}, "
                             f"got {list(self.loss_weights)}")


@dataclass
class DPOStageConfig(GeneratingStageConfig):
    # The policy, and its frozen reference.
    init_from: str = "sft:latest"
    data: PairData = field(default_factory=PairData)
    trainer: CheckpointingTrainerConfig = field(default_factory=CheckpointingTrainerConfig)
    dpo: DPOSettings = field(default_factory=DPOSettings)


ALGORITHMS = ("grpo", "rloo")


@dataclass
class GroupSettings(OnlineRLSettings):
    """Online RL from groups of sampled responses, each judged against its group (RLOO's settings, and GRPO's
    but for its loss)."""
    # Responses sampled per prompt: each is judged against the others of its group (its baseline).
    num_generations: int = 8
    # Tokens sampled per response (a response ends at its first eos).
    max_completion_length: int = 80
    temperature: float = 1.0
    # KL penalty to the reference (the starting policy); 0 drops the reference model and the KL budget with it.
    beta: float = 0.05
    # Policy-ratio clipping, and optimisation passes over each batch of samples.
    epsilon: float = 0.2
    num_iterations: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be at least 2 (a group), got {self.num_generations}")
        if self.temperature <= 0:
            raise ValueError(f"grpo.temperature must be positive, got {self.temperature}")


@dataclass
class GRPOSettings(GroupSettings):
    """GRPO's own: how its loss aggregates and how it scales rewards."""
    # TRL's loss_type (dapo, grpo, dr_grpo, bnpo, ...) and how rewards are scaled within a group (group, batch,
    # none).
    loss_type: str = "dapo"
    scale_rewards: str = "group"


@dataclass
class RLOOStageConfig(GeneratingStageConfig):
    # grpo: TRL's GRPOTrainer; rloo: its RLOOTrainer (REINFORCE leave-one-out) on the same setup. The entry's
    # stage is the algorithm's name (grpo:latest, rloo:latest). Chosen as a config group (conf/algorithm/).
    algorithm: str = "rloo"
    init_from: str = "sft:latest"
    # The reward model to score with (a reference, as init_from). null: reward:latest when no reward_functions
    # are given, none otherwise; name one to combine it with the functions.
    reward_model: Optional[str] = None
    # Reward functions as module:function (TRL's signature: f(prompts, completions, **columns) -> list of
    # floats), or by name: demo_oracle, the demo's gold judge (an upper bound on what RL can reach on the demo,
    # never a default: the entry is marked oracle).
    reward_functions: List[str] = field(default_factory=list)
    # One weight per reward source, the reward model first, then the functions in order (null: all 1).
    reward_weights: Optional[List[float]] = None
    data: PromptData = field(default_factory=PromptData)
    trainer: CheckpointingTrainerConfig = field(default_factory=CheckpointingTrainerConfig)
    grpo: GroupSettings = field(default_factory=GroupSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.reward_model is None and not self.reward_functions:
            self.reward_model = "reward:latest"
        sources = int(self.reward_model is not None) + len(self.reward_functions)
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ValueError(f"reward_weights needs {sources} weights (the reward model first, then each of "
                             f"reward_functions), got {list(self.reward_weights)}")


@dataclass
class GRPOStageConfig(RLOOStageConfig):
    algorithm: str = "grpo"
    grpo: GRPOSettings = field(default_factory=GRPOSettings)


STAGE_SCHEMAS = {"pretrain": PretrainStageConfig, "sft": SFTStageConfig, "reward": RewardStageConfig,
                 "ppo": PPOStageConfig, "dpo": DPOStageConfig, "grpo": GRPOStageConfig, "rloo": RLOOStageConfig}


def _has_key(schema, parts: list[str]) -> bool:
    """Whether the dotted key (as parts) names a setting of the schema: a field, a field of a section, or any key
    under a dict field (data.flaw_shares.swap)."""
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(schema)
        if part not in {f.name for f in fields(schema)}:
            return False
        hint = hints[part]
        if is_dataclass(hint):
            schema = hint
        else:
            return typing.get_origin(hint) in (dict, Dict) or i == len(parts) - 1
    return True


def _key(override: str) -> list[str]:
    """The dotted key of a Hydra override (+data.path=x, ~peft, model=hub, hydra/launcher=slurm) as parts."""
    key = re.split(r"[=@]", override.lstrip("+~"), maxsplit=1)[0]
    return re.split(r"[./]", key)


HYDRA_KEYS = ("experiment", "hydra", "stage_experiment")


def stages_with_key(override: str) -> list[str]:
    """The stages whose config has the override's key."""
    parts = _key(override)
    if parts[0] in HYDRA_KEYS:
        return list(STAGE_SCHEMAS)
    return [stage for stage, schema in STAGE_SCHEMAS.items() if _has_key(schema, parts)]


def overrides_for(stage: str, overrides: list[str]) -> list[str]:
    """The overrides, of those meant for several stages (make all's ARGS), that this stage's config has: a
    pretraining key (model.hidden_size=512, data.block_size=512) goes to pretraining alone. One no stage has is
    kept, so that the stage names it as unknown."""
    def meant(o: str) -> bool:
        having = stages_with_key(o)
        return stage in having or not having
    return [o for o in overrides if o.startswith("-") or meant(o)]


def refuse_keys_of_other_stages(stage: str, argv: list[str] | None = None) -> None:
    """Stop, naming the stages that read it, at an override this stage's config does not have but another's does
    (data.block_size given to ppo). A key no stage has is left to Hydra, which names it as unknown."""
    argv = sys.argv[1:] if argv is None else argv
    if stage == "grpo" and "algorithm=rloo" in argv:
        stage = "rloo"
    for o in argv:
        having = [] if o.startswith("-") else stages_with_key(o)
        if having and stage not in having:
            key = ".".join(_key(o))
            print(f"error: {key} is not a setting of {stage}: {', '.join(having)} read{'s' * (len(having) == 1)} it. "
                  f"Pass it to {'that stage' if len(having) == 1 else 'those stages'} (make {having[0]} "
                  f"ARGS=\"{o}\"); make all gives each stage only the keys it reads.", file=sys.stderr)
            sys.exit(2)


def register_schemas() -> None:
    """Make the schemas known to Hydra: each primary config names its schema in its defaults list."""
    cs = ConfigStore.instance()
    for stage, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"{stage}_schema", node=schema)


def validate(cfg: DictConfig):
    """Build the typed config object from a composed config, naming the key at fault if it is wrong."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise PipelineError(f"missing value for {', '.join(missing)}: set it on the command line, "
                            f"e.g. ARGS=\"{missing[0]}=...\"")
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"invalid configuration: {e}") from None
    except Exception as e:  # omegaconf's MissingMandatoryValue, InterpolationResolutionError, ...
        raise PipelineError(f"invalid configuration: {e}".splitlines()[0]
                            + (f" (key: {e.full_key})" if getattr(e, "full_key", None) else "")) from None
