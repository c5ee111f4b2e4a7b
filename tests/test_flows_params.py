"""The flows' parameters are the jobs' options: each flow's parameter schema (what a deployment's runs are
validated against by the Prefect server) has exactly the config fields the flow exposes, with the config's
defaults, descriptions and choices, plus the flow-only parameters that flows/params.py declares."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema

from pipelines.segment import SegmentConfig
from pipelines.train import TrainConfig

FLOW_ONLY = {
    "segment-bucket": {"gallery_size", "storage_options"},  # storage_options: None for none, described for flows
    "nightly-retrain": {"warm_start", "resegment_input", "resegment_output", "actors", "device"},
}


def _flow(name: str) -> tuple[Any, Any, type, tuple[str, ...]]:
    from flows import params
    from flows.nightly_retrain import nightly_retrain
    from flows.segment_bucket import segment_bucket

    if name == "segment-bucket":
        return segment_bucket, params.SegmentBucketParams, SegmentConfig, params.SEGMENT_OPTIONS
    return nightly_retrain, params.NightlyRetrainParams, TrainConfig, params.TRAIN_OPTIONS


@pytest.mark.parametrize("name", ["segment-bucket", "nightly-retrain"])
def test_flow_parameter_schema_is_the_configs_fields(name: str) -> None:
    flow, model, config, options = _flow(name)
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    properties = schema["properties"]
    assert list(properties) == list(model.model_fields)  # one flat parameter per field, in order
    assert set(options) <= {spec.name for spec in dataclasses.fields(config)}
    shared = set(options) - FLOW_ONLY[name]
    assert set(properties) == shared | FLOW_ONLY[name]
    for option in shared:
        meta, prop = config.metadata(option), properties[option]
        assert prop["description"] == meta["help"], option
        if meta.get("required"):
            assert "default" not in prop, option
        else:
            assert prop["default"] == config.default(option), option
        if "choices" in meta:
            assert prop["enum"] == list(meta["choices"]), option
        schema_bounds = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
        constraints = {key: _number(prop)[word] for key, word in schema_bounds.items() if word in _number(prop)}
        if option != "actors":  # N or MIN-MAX text, parsed by SegmentConfig.actor_range
            assert constraints == config.bounds(option), option  # the server refuses what the job would
    assert set(schema["required"]) == {option for option in shared if config.metadata(option).get("required")}
    for option in FLOW_ONLY[name]:
        description = model.model_fields[option].description
        assert description and properties[option].get("description") == description, option


def _number(prop: dict[str, Any]) -> dict[str, Any]:
    """The numeric branch of a parameter's schema (an optional number's is in ``anyOf``)."""
    return next((branch for branch in prop.get("anyOf", []) if branch.get("type") in ("integer", "number")), prop)


def test_nightly_retrain_segments_with_the_segmentation_jobs_actors_and_device() -> None:
    _, model, *_ = _flow("nightly-retrain")
    fields = model.model_fields
    assert fields["device"].description == SegmentConfig.metadata("device")["help"]
    assert fields["device"].default == SegmentConfig.default("device")
    assert fields["actors"].description == SegmentConfig.metadata("actors")["help"]


def test_flow_parameters_build_the_jobs_configs() -> None:
    _, segment_params, *_ = _flow("segment-bucket")
    params = segment_params(input="in", output="out", model="m", device="cpu", storage_options={"anon": True})
    config = params.segment_config()
    assert (config.input, config.device, config.storage_options) == ("in", "cpu", {"anon": True})
    assert config.gpu_wait_s == SegmentConfig.default("gpu_wait_s")  # not exposed: the job's default
    _, train_params, *_ = _flow("nightly-retrain")
    train = train_params(data="d", registry="r", epochs=3, class_weights="median-frequency").train_config("r")
    assert (train.data, train.epochs, train.class_weights, train.init, train.promote) == (
        "d",
        3,
        "median-frequency",
        "r",
        False,
    )
