"""The flows' parameters, made from the jobs' configurations.

A parameter that is also a job option (``SegmentConfig`` or ``TrainConfig``, see ``pipelines.common.options``) takes
its type, default, description, choices and bounds from the config field (and text must not be empty), so
the Prefect server refuses a bad value before a run starts. Flow-only parameters are declared here once.
Each flow's parameter model gives the flow function its flat signature (:func:`takes`), from which Prefect
builds the deployment's parameter schema, so ``prefect deployment run ... --param device=cuda`` works.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from pipelines.common.options import Options
from pipelines.segment import SegmentConfig
from pipelines.train import TrainConfig

Actors = Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=r"^\s*\d+\s*(-\s*\d+\s*)?$")] | None
"""``--actors``: N, or MIN-MAX as text."""
FLOW_TYPES = {"actors": Actors}
"""Config fields that a flow types otherwise than the config (``from_config``)."""
StorageOptions = Annotated[
    dict[str, Any] | None,
    Field(
        description="fsspec options for input, output and model, e.g. {'endpoint_url': ...}; "
        "keep credentials in the environment, not in parameters"
    ),
]


def from_config(config: type[Options], name: str) -> tuple[Any, Any]:
    """The parameter of config field ``name``: its type (its choices as a ``Literal``; ``FLOW_TYPES`` replaces
    it), default, description and bounds (pydantic ``Field`` constraints; text must not be empty)."""
    meta = config.metadata(name)
    annotation = FLOW_TYPES.get(name)
    if annotation is None:
        annotation = typing.get_type_hints(config)[name]
        if "choices" in meta:
            choices = Literal[tuple(meta["choices"])]
            annotation = choices | None if type(None) in typing.get_args(annotation) else choices
    default = ... if meta.get("required") else config.default(name)
    bounds = config.bounds(name) | ({"min_length": 1} if annotation is str else {})
    return Annotated[annotation, Field(**bounds)], Field(default, description=meta["help"])


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SegmentBucketBase(_Params):
    @property
    def fs_options(self) -> dict[str, Any]:
        """``storage_options`` as fsspec takes them (``{}`` when unset)."""
        return dict(self.storage_options or {})

    def segment_config(self) -> SegmentConfig:
        """The segmentation job's configuration; ``validate()`` names a bad value."""
        shared = {name: getattr(self, name) for name in SEGMENT_OPTIONS}
        return SegmentConfig(**shared, storage_options=self.fs_options)


SEGMENT_OPTIONS = (
    "input",
    "output",
    "model",
    "ray_address",
    "actors",
    "device",
    "precision",
    "batch_size",
    "overlays",
    "depth",
    "camera",
)
"""The segmentation options that ``segment-bucket`` exposes as the config declares them (the others keep the
config's defaults; ``storage_options`` is declared for flows: None for none)."""

SegmentBucketParams: type[_SegmentBucketBase] = create_model(
    "SegmentBucketParams",
    __base__=_SegmentBucketBase,
    __doc__="The validated parameters of ``segment-bucket``.",
    **{name: from_config(SegmentConfig, name) for name in SEGMENT_OPTIONS},
    gallery_size=(int, Field(12, ge=0, le=200, description="image/mask overlays in report.html")),
    storage_options=(StorageOptions, None),
)


class _NightlyRetrainBase(_Params):
    @model_validator(mode="after")
    def _resegment_pair(self) -> _NightlyRetrainBase:
        if bool(self.resegment_input) != bool(self.resegment_output):
            raise ValueError("resegment_input and resegment_output must be given together")
        return self

    def train_config(self, init: str | None) -> TrainConfig:
        """The training job's configuration, starting from ``init`` (a checkpoint or registry); the run is
        registered but not promoted (the flow decides)."""
        return TrainConfig(**{name: getattr(self, name) for name in TRAIN_OPTIONS}, init=init, promote=False)


TRAIN_OPTIONS = (
    "data",
    "registry",
    "model",
    "width",
    "epochs",
    "workers",
    "gpus_per_worker",
    "recipe",
    "class_weights",
    "promote_margin",
    "ray_address",
)
"""The training options that ``nightly-retrain`` exposes (the others keep the config's defaults)."""

NightlyRetrainParams: type[_NightlyRetrainBase] = create_model(
    "NightlyRetrainParams",
    __base__=_NightlyRetrainBase,
    __doc__="The validated parameters of ``nightly-retrain``.",
    **{name: from_config(TrainConfig, name) for name in TRAIN_OPTIONS},
    warm_start=(bool, Field(True, description="start from the champion's weights, if there is one")),
    resegment_input=(
        str | None,
        Field(None, description="after a promotion, re-segment this URI with the new champion"),
    ),
    resegment_output=(str | None, Field(None, description="output URI of the re-segmentation (with resegment_input)")),
    actors=from_config(SegmentConfig, "actors"),
    device=from_config(SegmentConfig, "device"),
)

F = TypeVar("F", bound=Callable[..., Any])


def takes(params: type[BaseModel]) -> Callable[[F], F]:
    """Give a flow function taking ``**parameters`` the flat signature of ``params`` (one keyword parameter
    per field, with its type, constraints and default) and an ``Args:`` section in its docstring with each
    field's description, the two places Prefect reads a parameter schema from, before ``@flow`` reads them."""

    def with_signature(fn: F) -> F:
        fn.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if spec.is_required() else spec.default,
                    annotation=Annotated[(spec.annotation, *spec.metadata)] if spec.metadata else spec.annotation,
                )
                for name, spec in params.model_fields.items()
            ],
            return_annotation=inspect.signature(fn).return_annotation,
        )
        described = "".join(f"    {name}: {spec.description}\n" for name, spec in params.model_fields.items())
        fn.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\nArgs:\n{described}"
        return fn

    return with_signature
