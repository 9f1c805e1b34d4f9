"""The run's config: typed, strict (unknown keys are errors) and cross-checked, loaded from YAML.

Every peer of a run works from the same `RunConfig`; the coordinator publishes it and volunteers
read it back, so it must round-trip through plain JSON (`model_dump(mode="json")`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from swarm.errors import ConfigError

DATA_SPEC_HELP = "digits, hf:NAME[:CONFIG][@SPLIT], or a local file/folder that `datasets` can read"
_HF_SPEC = re.compile(r"^hf:(?P<name>[^:@]+)(?::(?P<config>[^@]+))?(?:@(?P<split>.+))?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(description="timm model name, e.g. vit_tiny_patch16_224")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for timm.create_model")
    seed: int = Field(0, description="seed of the initial W and non-linear parameters")

    @property
    def image_size(self) -> int:
        size = self.args.get("img_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def channels(self) -> int:
        return int(self.args.get("in_chans", 3))


class OuterConfig(_Strict):
    """The outer step every merge takes with the heads' mean change (the negative of DiLoCo's
    pseudo-gradient), computed alike on every peer; its momentum is part of the shared state."""

    optimizer: Literal["average", "nesterov"] = Field(
        "average", description="average: W += lr * the heads' mean change (lr 1: plain averaging); nesterov: with a "
                               "momentum buffer per shared tensor, as DiLoCo's outer optimizer")
    lr: PositiveFloat = Field(1.0, description="outer learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Nesterov momentum (optimizer: nesterov)")


class DiLoCoConfig(_Strict):
    """The DiLoCo baseline (arXiv 2311.08105) LTE is compared with in the simulation: N = lte.heads
    workers, each training the whole model with AdamW at train.full_lr on its own shard (batch
    train.batch_size / N, as an LTE head), averaging their changes every H steps through an outer
    step. Defaults: DiLoCo's published outer Nesterov step."""

    inner_steps: int = Field(0, ge=0, description="H, local steps between syncs (0: lte.merge_every)")
    outer: OuterConfig = Field(default_factory=lambda: OuterConfig(optimizer="nesterov", lr=0.7, momentum=0.9),
                               description="the outer step of every sync")


class LTEConfig(_Strict):
    heads: PositiveInt = Field(description="N, the run's number of LoRA heads")
    rank: PositiveInt = Field(description="r, the rank of every head")
    alpha: PositiveFloat = Field(description="LoRA alpha; the head scale is s = alpha / rank")
    merge_every: PositiveInt = Field(description="T, local steps between merges")
    variant: Literal["reset", "reset_less"] = "reset_less"
    nonlinear: Literal["freeze", "replicate"] = "freeze"
    storage: Literal["fp32", "bf16", "int8", "nf4"] = "fp32"
    vectorised: bool = Field(
        False, description="run a peer's several heads under vmap instead of one after another (see LTEModel.vectorised)")
    split_qkv: bool = Field(
        False, description="adapt q, k and v of timm's fused qkv as three projections, each with its own rank-r head "
                           "(as the paper's code does), instead of one rank-r head on the fused layer")
    init_scale: Literal["spectral", "reference"] = Field(
        "spectral", description="scale of each head's semi-orthogonal A (r x n): sqrt(r/n), its spectral scaling, or "
                                "sqrt(n/r), as the paper's code does")
    outer: OuterConfig = Field(default_factory=OuterConfig, description="the outer step each merge takes")
    fragments: PositiveInt = Field(
        1, description="k: W's parts (swarm.parts) merged in turn, round i merging parts i mod k, i mod k + k, ... so "
                       "that a round moves about 1/k of the bytes and each part is merged every k rounds (the run's "
                       "last round merges all); 1: every part every round")


class ParamGroup(_Strict):
    """Optimizer settings of one group of parameters; unset values follow train.weight_decay and
    train.grad_clip. LTE heads have two groups (their LoRA factors and their replicas of the
    non-linear parameters), the full-rank baseline one. Each group's learning rate is its own
    train key (`lr`, `replica_lr`, `full_lr`)."""

    weight_decay: float | None = Field(None, ge=0.0, description="AdamW weight decay of the group")
    grad_clip: float | None = Field(
        None, ge=0.0, description="clip the group's gradient norm (per head) to this; 0 turns clipping off. Setting it "
                                  "for factors or replicas clips the two apart; unset for both, each head is clipped "
                                  "as a whole at train.grad_clip")


class TrainConfig(_Strict):
    batch_size: PositiveInt = Field(description="cumulative batch over all heads (per head: batch_size / heads)")
    samples: PositiveInt = Field(description="training budget in samples, summed over heads")
    # Two kinds of parameter train in a head and want different rates: a step of the factors moves
    # W by s * |A| times the step (alpha / r and A's scale set it), while the replicas (norms,
    # biases, embeddings) are trained directly, as full-rank training trains them.
    lr: PositiveFloat = Field(description="learning rate of the heads' LoRA factors A and B")
    replica_lr: PositiveFloat | None = Field(
        None, description="learning rate of the heads' replicas of the non-linear parameters (lte.nonlinear: "
                          "replicate); unset: full_lr, as they are trained like full-rank parameters")
    full_lr: PositiveFloat = Field(description="learning rate of the full-rank baseline")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: PositiveFloat | None = None
    seed: int = 0
    eval_every: PositiveInt = Field(1, description="evaluate every this many merge rounds")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 autocast for forward and backward (W master, factors and optimizer stay fp32)")
    checkpointing: bool = Field(False, description="recompute each block's activations in backward (timm's set_grad_checkpointing): less memory, more compute")
    factors: ParamGroup = Field(default_factory=ParamGroup, description="the heads' LoRA factors A and B")
    replicas: ParamGroup = Field(default_factory=ParamGroup, description="the heads' replicas of the non-linear "
                                                                         "parameters (lte.nonlinear: replicate)")
    full: ParamGroup = Field(default_factory=ParamGroup, description="the full-rank baseline's parameters")

    @property
    def replica_rate(self) -> float:
        """The replicas' peak learning rate: `replica_lr`, or full-rank's where unset."""
        return self.full_lr if self.replica_lr is None else self.replica_lr


class DataConfig(_Strict):
    source: str = Field("digits", description=DATA_SPEC_HELP)
    eval_source: str | None = Field(
        None, description="where the evaluation set comes from: another split of an hf: source (`@validation`) or any "
                          "data spec; unset: the first `holdout` records of `source`, which training then skips by content")
    holdout: PositiveInt = Field(360, description="records in the evaluation set (the first ones of eval_source, or of source)")
    validation: int = Field(
        0, ge=0, description="records carved out of the training data to tune on (scripts/tune.py): the first ones "
                             "of source that are not in the evaluation set; never trained on while set")
    shuffle_buffer: PositiveInt = 1024
    rotate_shards: bool = Field(False, description="stream i reads shard (i + epoch) mod N: disjoint at any time, all data over epochs")

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        check_data_spec(self.source)
        if self.eval_source is not None:
            check_data_spec(self.eval_spec)
        return self

    @property
    def eval_spec(self) -> str:
        """The data spec of the evaluation set: `source` itself, or `eval_source` with a bare
        `@SPLIT` resolved against the hf: source (same dataset and config, another split)."""
        return resolve_eval_spec(self.source, self.eval_source)


class SwarmConfig(_Strict):
    """Timing of the decentralized protocol. Every wait has a bound: nothing waits forever."""

    lease_seconds: PositiveFloat = Field(20.0, description="a head lease lasts this long unless renewed")
    settle_seconds: PositiveFloat = Field(1.0, description="DHT settle delay before reading back claims and records")
    merge_grace: PositiveFloat = Field(10.0, description="after the first peer is ready for a merge, others have at least this long")
    merge_slack: float = Field(0.5, ge=0.0, description="... or this fraction of the first peer's training time, if longer")
    close_quorum: float = Field(
        0.0, ge=0.0, le=1.0, description="after its window, a round closes only once this fraction of the heads' "
                                         "holders are ready (or a round's timeout after the first was); 0: the "
                                         "window alone closes it")
    round_timeout: PositiveFloat = Field(60.0, description="bound on waiting for contributions and hashes of one round")
    request_timeout: PositiveFloat = Field(15.0, description="bound on one download from one peer")
    poll_seconds: PositiveFloat = Field(0.2, description="how often DHT records are polled while waiting")
    poll_max_seconds: PositiveFloat = Field(
        2.0, description="while a round waits with nothing new (transfers on a slow link), polls back off to this")
    read_replicas: int = Field(
        2, ge=0, description="a round's polls read its records straight from this many of the 5 DHT nodes nearest to "
                             "them (every record is stored on those 5), drawn at random; each node asked sends the "
                             "whole key, so on a slow link this caps what polling costs. 0: all 5")
    min_heads: PositiveInt = Field(1, description="the first round starts once this many heads are held")
    checkpoint_every: PositiveInt = Field(5, description="the coordinator checkpoints W every this many rounds")
    max_update: PositiveFloat = Field(10.0, description="reject contributions that would move any weight by more than this in one merge")
    # A layer's size here is the larger of its norm and its reach (how far one round of AdamW steps
    # at the run's rates can move it): an honest head stays below 1/4 of it on digits at the tuned
    # rates (also with 2 heads and T = 20, whose share of a merge is larger), and no head's change
    # exceeded 4.1x the round's median: both bounds leave margin.
    max_relative_update: PositiveFloat = Field(
        1.0, description="reject contributions whose change of a layer, per head, exceeds this fraction of the layer's "
                         "size: the larger of its norm and how far one round of AdamW steps at the run's rates can "
                         "move it")
    robust_clip: float = Field(
        8.0, ge=0.0, description="with 3 or more contributions, scale each layer's change down to this multiple of the "
                                 "round's median (per head); 0 turns it off")
    max_heads_per_peer: PositiveInt = Field(8, le=64, description="most heads one peer may hold (readers look at 64 "
                                            "claims of one key at most)")
    clock_skew: PositiveFloat = Field(10.0, description="how far peers' clocks may disagree (seconds); records dated further ahead are ignored")
    parallel_downloads: PositiveInt = Field(3, description="contributions downloaded (and held in memory) at once")
    merge: Literal["reduce", "gather"] = Field(
        "reduce", description="reduce: W is cut into parts, two of the round's contributors reduce each part and "
                              "everyone downloads the reduced parts (bytes per peer do not grow with the swarm); "
                              "gather: every peer downloads every contribution")
    parts: int = Field(0, ge=0, description="parts W is cut into for the reduced merge (0: two per head of the run)")
    part_owners: int = Field(
        2, ge=1, le=2, description="members that reduce each part: 2, which check each other; or 1, checked by the "
                                   "coordinator's recomputation (half the bytes per peer; while the coordinator is "
                                   "down, parts are fetched raw and reduced by every peer)")
    contribution_dtype: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="numbers of a contribution on the wire (factors, dense deltas, replica deltas): bf16 halves "
                            "its bytes, blockwise 8-bit quarters them")
    reduced_dtype: Literal["fp32", "bf16", "int8", "int4"] = Field(
        "fp32", description="numbers of a merged total on the wire (a reduced part): bf16 halves, blockwise 8-bit "
                            "(one float32 scale per 256 values) quarters its bytes, blockwise 4-bit (one scale per 64) "
                            "takes 0.14 of them. Every peer, and the simulation, adds the same rounded values")
    reduced_rounding: Literal["nearest", "stochastic"] = Field(
        "nearest", description="how int8 and int4 reduced parts round: to the nearest code, or stochastically (up with "
                               "the probability of the fraction, from a seed every peer shares): unbiased, so that "
                               "changes under half a step still reach W on average")
    coordinator_recomputes: bool = Field(
        True, description="in the reduced merge the coordinator reduces every part itself from the raw contributions, "
                          "so that no two colluding owners can change the agreed W (it then downloads every contribution)")
    verify_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the heads whose round the coordinator redoes after it merged it, "
                                         "from what their holders committed to (`peers.verify`), publishing a verdict "
                                         "on each; drawn from its signature over the round, which no holder can "
                                         "compute before it offered. A contribution that does not reproduce is "
                                         "taken out of W two rounds on, by every peer, and its writer's key revoked")
    rollback_rounds: int = Field(
        8, ge=0, le=64, description="with swarm.verify_rate: a contribution that does not reproduce takes with it every "
                                    "contribution merged since its writer's first round no verdict passed, when those "
                                    "are at most this many rounds (W goes back to where it was then, and every head "
                                    "starts afresh: the honest work of those rounds was trained against the cheat's); "
                                    "more rounds, or 0: only its writer's contributions are taken out")
    verifiers: int = Field(
        2, ge=0, le=8, description="with swarm.verify_rate: spare volunteers (standing by without a head) that redo a "
                                   "round's drawn heads, instead of the coordinator; a round all of them pass passes, "
                                   "any other outcome the coordinator redoes itself and decides, and a verifier it "
                                   "contradicts is revoked. 0, or no spare volunteer: the coordinator redoes them all")
    accept_unverifiable: bool = Field(
        True, description="with swarm.verify_rate: merge contributions nobody can redo (trained on a volunteer's private "
                          "data, carried over from a missed round, or pushed from behind a NAT). False leaves them out "
                          "of every round, and volunteers that would send them are told so when they join")
    overlap: bool = Field(
        False, description="train the next T steps while a round's bytes move, and apply its merge one round late (at "
                           "the end of those steps); reset-less variant only")
    eager: bool = Field(
        False, description="with swarm.overlap: a head's own contribution counts in its forward as soon as it goes "
                           "out, at the weight the merge gives it, until the agreed merge replaces it (instead of at "
                           "full weight until then)")
    closed: bool = Field(False, description="admit only the signing keys in swarm.members and peers holding an invite "
                                            "the coordinator signed (`lte-swarm invite`)")
    members: tuple[str, ...] = Field((), description="fingerprints of signing keys a closed run admits without an invite")

    @field_validator("members")
    @classmethod
    def _fingerprints(cls, members: tuple[str, ...]) -> tuple[str, ...]:
        from swarm.identity import FINGERPRINT_CHARS, is_fingerprint  # hivemind only where a key is read

        bad = [m for m in members if not is_fingerprint(m)]
        if bad:
            raise ValueError(f"swarm.members: {bad[0]!r} is not a key fingerprint ({FINGERPRINT_CHARS} lowercase hex "
                             "digits, as `lte-swarm key` prints it)")
        return members

    @model_validator(mode="after")
    def _check(self) -> "SwarmConfig":
        if self.part_owners == 1 and not self.coordinator_recomputes:
            raise ValueError("swarm.part_owners: 1 needs swarm.coordinator_recomputes (one owner's sum is checked only "
                             "by the coordinator's)")
        if self.request_timeout > self.round_timeout:
            raise ValueError(f"swarm.request_timeout ({self.request_timeout}) exceeds swarm.round_timeout ({self.round_timeout})")
        if not self.accept_unverifiable and self.verify_rate <= 0:
            raise ValueError("swarm.accept_unverifiable: false needs swarm.verify_rate above 0 (a run that redoes no "
                             "round can verify no contribution, and would merge none)")
        if self.settle_seconds * 2 >= self.lease_seconds:
            raise ValueError(f"swarm.lease_seconds ({self.lease_seconds}) must exceed twice swarm.settle_seconds ({self.settle_seconds})")
        return self


class RunConfig(_Strict):
    model: ModelConfig
    lte: LTEConfig
    train: TrainConfig
    data: DataConfig = Field(default_factory=DataConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    diloco: DiLoCoConfig = Field(default_factory=DiLoCoConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.train.batch_size % self.lte.heads:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of lte.heads ({self.lte.heads})"
            )
        if self.swarm.min_heads > self.lte.heads:
            raise ValueError(f"swarm.min_heads ({self.swarm.min_heads}) exceeds lte.heads ({self.lte.heads})")
        if self.swarm.overlap and self.lte.variant != "reset_less":
            raise ValueError("swarm.overlap needs lte.variant: reset_less (a merge applied a round late must leave the "
                             "head's newer work in its forward, which only the reset-less baseline can)")
        if self.lte.fragments > self.n_parts:
            raise ValueError(f"lte.fragments ({self.lte.fragments}) exceeds the parts W is cut into ({self.n_parts}, "
                             "swarm.parts or two per head): raise swarm.parts or lower lte.fragments")
        if self.swarm.verify_rate > 0 and (self.swarm.overlap or self.lte.fragments > 1):
            raise ValueError("swarm.verify_rate redoes a head's round from its start on the W it began from: not with "
                             "swarm.overlap (its steps train on a W a merge changes midway) or lte.fragments above 1 "
                             "(a fragment's change spans several rounds); a verdict on a round nobody can redo would "
                             "evict honest volunteers")
        if self.swarm.eager and not self.swarm.overlap:
            raise ValueError("swarm.eager corrects merges that apply a round late: it needs swarm.overlap: true")
        if self.train.samples < self.train.batch_size:
            raise ValueError(f"train.samples ({self.train.samples}) is below one batch (train.batch_size = {self.train.batch_size})")
        return self

    @property
    def n_parts(self) -> int:
        """Parts W is cut into for the reduced merge and for fragments (fewer for a model with fewer
        layers and parameters: see `swarm.wire.plan_parts`)."""
        return self.swarm.parts or 2 * self.lte.heads

    @property
    def head_batch(self) -> int:
        return self.train.batch_size // self.lte.heads

    @property
    def steps(self) -> int:
        """Local steps per head (equal to full-rank steps at the same samples)."""
        return -(-self.train.samples // self.train.batch_size)

    @property
    def rounds(self) -> int:
        """Merge rounds in the whole run (the last one may be shorter than T steps)."""
        return -(-self.steps // self.lte.merge_every)

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted keys replaced (`{"data.source": "digits"}`), re-validated."""
        raw = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config section {dotted}")
                node = node[part]
            node[leaf] = value
        return parse_config(raw, origin="overrides")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (as scripts take them with `--set`) as dotted overrides for
    `RunConfig.with_overrides`, each value read as YAML (`lte.rank=8`, `swarm.overlap=true`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. lte.rank=8")
        out[key] = yaml.safe_load(value)
    return out


def check_data_spec(spec: str) -> None:
    """Reject data specs that cannot be valid whatever is on disk."""
    if not spec.strip():
        raise ValueError(f"empty data spec; expected {DATA_SPEC_HELP}")
    if spec.startswith("hf:") and not _HF_SPEC.match(spec):
        raise ValueError(f"malformed data spec {spec!r}; expected hf:NAME[:CONFIG][@SPLIT]")


def resolve_eval_spec(source: str, eval_source: str | None) -> str:
    """`eval_source` as a full data spec; `@SPLIT` names another split of an hf: `source`."""
    if eval_source is None:
        return source
    if not eval_source.startswith("@"):
        return eval_source
    if not source.startswith("hf:"):
        raise ValueError(f"data.eval_source {eval_source!r} names a split, which needs an hf: data.source "
                         f"(got {source!r}); give a data spec instead")
    name, config, _ = parse_hf_spec(source)
    return f"hf:{name}{':' + config if config else ''}{eval_source}"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> (name, config, split), split defaulting to train."""
    match = _HF_SPEC.match(spec)
    if not match:
        raise ValueError(f"malformed data spec {spec!r}; expected hf:NAME[:CONFIG][@SPLIT]")
    return match["name"], match["config"], match["split"] or "train"


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "missing":
            msg = "required key is missing"
        elif "input" in item and not isinstance(item["input"], dict):
            msg += f" (got {item['input']!r})"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_config(raw: Any, origin: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections (model, lte, train, data), got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_describe(exc)}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; every failure is a one-line `ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(raw, origin=str(path))
