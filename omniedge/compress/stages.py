"""Recipe stages as small typed objects, as llm-compressor's modifiers are.

A stage is built once from its recipe settings (`Settings.parse` validates them and fills every default;
the stage's constructor checks them against the model, before any long work) and then `apply`-ed to
each thinker decoder layer in turn with a `LayerWork`: the layer on the device, the teacher's
calibration statistics and inputs of that layer, and what earlier stages did to it. A stage that needs
every layer's statistics before it can decide anything (a non-uniform expert budget) says so with
`needs_all_stats`; the pipeline then runs a statistics-only sweep first and hands them to `plan`.

New stages register in `STAGE_TYPES`; new saliencies and quantizers plug into their own registries
(omniedge.compress.saliency, omniedge.compress.quantizers) without touching the pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from omniedge.compress.layer_inputs import LayerInputs
    from omniedge.compress.moe import LayerStats


@dataclass(frozen=True)
class ModelFacts:
    """What stages check their settings against: the thinker's MoE shape."""

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    norm_topk_prob: bool = True
    num_layers: int | None = None  # decoder layers (None: not known)

    def is_last_layer(self, index: int) -> bool:
        """Whether decoder layer `index` is the last one (its output goes to the final norm and lm_head)."""
        return self.num_layers is not None and index == self.num_layers - 1


@dataclass
class LayerWork:
    """One decoder layer as the stages see it, in order: prune fills `kept`, quantize `packed`."""

    index: int
    layer: nn.Module
    prefix: str  # canonical name prefix, "thinker.model.layers.{index}."
    stats: LayerStats | None  # the teacher's calibration statistics (MoE layers)
    inputs: LayerInputs | None  # the teacher's calibration inputs of its weights (when a stage needs them)
    top_k: int
    normalise: bool
    kept: list[int] | None = None  # experts kept, in the teacher's numbering
    packed: dict[str, Any] = field(default_factory=dict)  # canonical name -> quantizers.Packed
    report: dict[str, Any] = field(default_factory=dict)  # what `omniedge compress --report` shows

    @property
    def is_moe(self) -> bool:
        return hasattr(self.layer.mlp, "experts")


class Stage(ABC):
    """One recipe stage. Subclasses set `name`, `settings_type` (a frozen dataclass with `parse`)."""

    name: ClassVar[str]
    settings_type: ClassVar[Any]
    needs_inputs: bool = False  # keep the teacher's calibration inputs of each layer's weights
    needs_moe_output: bool = False  # keep the teacher's MoE output of those inputs too
    needs_all_stats: bool = False  # run a statistics-only sweep first and call `plan`

    def __init__(self, settings: Any, model: ModelFacts) -> None:
        self.settings, self.model = settings, model
        self.seconds = 0.0

    @classmethod
    def from_recipe(cls, raw: Mapping[str, Any], model: ModelFacts, where: str = "stage") -> Stage:
        return cls(cls.settings_type.parse(raw, where), model)

    def plan(self, stats: list[LayerStats]) -> None:  # noqa: B027  (optional hook)
        """Every MoE layer's teacher statistics, before the first `apply` (when `needs_all_stats`)."""

    @abstractmethod
    def apply(self, work: LayerWork) -> None:
        """Change `work.layer` in place (and record what was done in `work`)."""

    def config_updates(self, text_config: dict[str, Any]) -> None:  # noqa: B027
        """Edit the output's config.json thinker text config for what this stage did."""

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """What omniedge.json records for this stage."""
