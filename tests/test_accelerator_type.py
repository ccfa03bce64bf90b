"""An accelerator type no node has: `adallm serve`, serve_config.yaml and the bulk job warn instead of pending
in silence (a misspelt type would pend forever)."""
from __future__ import annotations

import logging

import pytest
import ray

from adallm_core.config import EngineArgs
from deployments.app import build_app
from deployments.resources import missing_accelerator_warning
from jobs.processor import Processor, ProcessorConfig


@pytest.fixture(scope="module")
def ray_with_an_l4_node():
    # the local node labelled as Ray labels an L4 machine
    ray.init(num_cpus=2, resources={"accelerator_type:L4": 1}, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_no_warning_before_ray_is_up():
    assert not ray.is_initialized()
    assert missing_accelerator_warning("L40S") is None


def test_a_type_the_cluster_has_gets_no_warning(ray_with_an_l4_node):
    assert missing_accelerator_warning("L4") is None
    assert missing_accelerator_warning(None) is None


def test_a_type_no_node_has_is_named_with_the_types_there_are(ray_with_an_l4_node):
    warning = missing_accelerator_warning("RTX-4090")
    assert "'RTX-4090'" in warning and "its nodes have: L4)" in warning and "GeForce-RTX-4090" in warning


def test_serve_app_and_bulk_job_warn_about_a_misspelt_type(ray_with_an_l4_node, caplog):
    with caplog.at_level(logging.WARNING):
        build_app({"accelerator_type": "l4"})
    assert [r.name for r in caplog.records if "'l4'" in r.getMessage()] == ["deployments.app"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        misspelt = Processor(ProcessorConfig(engine_args=EngineArgs(), accelerator_type="L40"))
        assert misspelt.check_cluster() == 1.0 and misspelt.check_cluster() == 1.0  # the job checks, then runs
        assert Processor(ProcessorConfig(engine_args=EngineArgs(), accelerator_type="L4")).check_cluster() == 1.0
    assert [r.name for r in caplog.records if "accelerator type" in r.getMessage()] == ["jobs.processor"]


def test_cpu_replicas_are_not_warned_about_their_accelerator_type(ray_with_an_l4_node, caplog):
    with caplog.at_level(logging.WARNING):
        Processor(ProcessorConfig(engine_args=EngineArgs(device="cpu"), accelerator_type="L40")).check_cluster()
    assert not caplog.records
