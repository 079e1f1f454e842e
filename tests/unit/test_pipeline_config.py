"""How the Ray wiring is configured, checked without starting Ray: ``ray.init`` arguments for a local
Ray vs an existing cluster, the actors' role resources, and the demo's flags > environment > defaults."""

from __future__ import annotations

import inspect
import os

import pytest
import ray

from kvstore.malloc_tuning import ALLOCATOR_ENV
from workers.demo import parse_args, pipeline_options, ray_options
from workers.pipeline import (
    REPO_ROOT,
    ROLE_RESOURCES,
    RayDecodeWorker,
    RayPrefillWorker,
    actor_options,
    ray_init_kwargs,
)

# What Ray refuses when joining an existing cluster (ray/_private/worker.py, "When connecting to an
# existing cluster, ...") plus what only means something to a Ray this process starts.
LOCAL_ONLY = {
    "num_cpus",
    "num_gpus",
    "resources",
    "labels",
    "object_store_memory",
    "_system_config",
    "include_dashboard",
}


def test_local_ray_starts_its_own_with_two_cpus_and_the_checkout_on_the_path() -> None:
    kwargs = ray_init_kwargs()
    assert kwargs["address"] == "local"  # never joins a stray RAY_ADDRESS or `ray start` by accident
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    env_vars = kwargs["runtime_env"]["env_vars"]
    assert env_vars["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    assert env_vars["TOKENIZERS_PARALLELISM"] == "false"
    assert ray_init_kwargs(4)["num_cpus"] == 4
    assert ray_init_kwargs(address="local")["num_cpus"] == 2
    inspect.signature(ray.init).bind(**kwargs)  # every name is one ray.init takes


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "ray://kvstore-workers-head-svc:10001"])
def test_joining_a_cluster_passes_only_what_ray_accepts_there(address: str) -> None:
    kwargs = ray_init_kwargs(address=address)
    assert kwargs["address"] == address
    assert not LOCAL_ONLY & kwargs.keys()
    # The nodes run the worker image; the driver's checkout path means nothing there.
    assert kwargs["runtime_env"] == {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **ALLOCATOR_ENV}}
    inspect.signature(ray.init).bind(**kwargs)
    with pytest.raises(ValueError, match="local Ray"):
        ray_init_kwargs(2, address=address)


def test_init_options_override_and_extend() -> None:
    kwargs = ray_init_kwargs(2, resources={"prefill": 1.0}, log_to_driver=True)
    assert kwargs["resources"] == {"prefill": 1.0} and kwargs["log_to_driver"] is True
    with pytest.raises(ValueError):
        ray_init_kwargs(0)


def test_actor_options_carry_the_role_resources_ray_accepts() -> None:
    assert actor_options() == {"num_cpus": 1.0}  # unpinned: anywhere with a free CPU
    assert ROLE_RESOURCES == {"prefill": {"prefill": 1.0}, "decode": {"decode": 1.0}}  # the KubeRay groups
    prefill = actor_options(4, ROLE_RESOURCES["prefill"])
    assert prefill == {"num_cpus": 4, "resources": {"prefill": 1.0}}
    # ray.remote validates its options when it wraps the class; no cluster is needed for that.
    for cls, role in ((RayPrefillWorker, "prefill"), (RayDecodeWorker, "decode")):
        actor_cls = ray.remote(**actor_options(1.0, ROLE_RESOURCES[role]))(cls)
        assert actor_cls._default_options["resources"] == {role: 1.0}
        assert actor_cls._default_options["num_cpus"] == 1.0
    for bad in ({"CPU": 1}, {"GPU": 1}, {"": 1}, {"prefill": 0}, {"decode": -1}):
        with pytest.raises(ValueError):
            actor_options(1.0, bad)
    with pytest.raises(ValueError):
        actor_options(0)


def test_demo_defaults_are_a_local_ray_and_an_in_process_store() -> None:
    args = parse_args([], environ={})
    assert (args.ray_address, args.store_target, args.token, args.tenant) == (None, None, None, "demo")
    assert ray_options(args) == {"num_cpus": None}  # init_ray's local default (2)
    assert pipeline_options(args) == {
        "num_prefill": 1,
        "num_decode": 1,
        "routing": "least_loaded",
        "num_cpus_per_actor": 1.0,
    }


def test_demo_takes_the_cluster_and_store_from_the_environment() -> None:
    env = {
        "RAY_ADDRESS": "auto",
        "KVSTORE_TARGET": "kvstore.kvstore.svc.cluster.local:50051",
        "KVSTORE_TOKEN": "s3cret",
    }
    args = parse_args(["--pin-roles", "--prefill-workers", "2", "--cpus-per-actor", "4"], environ=env)
    assert args.store_target == "kvstore.kvstore.svc.cluster.local:50051" and args.token == "s3cret"
    assert ray_options(args) == {"address": "auto"}
    options = pipeline_options(args)
    assert options["prefill_resources"] == {"prefill": 1.0} and options["decode_resources"] == {"decode": 1.0}
    assert (options["num_prefill"], options["num_cpus_per_actor"]) == (2, 4.0)
    # Flags win over the environment; an empty variable counts as unset.
    args = parse_args(
        ["--ray-address", "ray://head:10001", "--store-target", "h:1", "--token", "t"], environ=env
    )
    assert (args.ray_address, args.store_target, args.token) == ("ray://head:10001", "h:1", "t")
    args = parse_args([], environ={"RAY_ADDRESS": "", "KVSTORE_TARGET": "", "KVSTORE_TOKEN": ""})
    assert (args.ray_address, args.store_target, args.token) == (None, None, None)


def test_demo_takes_the_cluster_client_settings_from_the_environment() -> None:
    args = parse_args([], environ={})
    assert (args.replication, args.write_ack) == (2, "all")
    env = {
        "KVSTORE_TARGET": "dns:///kvstore-headless.kvstore.svc:50051",
        "KVSTORE_REPLICATION": "3",
        "KVSTORE_WRITE_ACK": "one",
    }
    args = parse_args([], environ=env)
    assert (args.store_target, args.replication, args.write_ack) == (
        "dns:///kvstore-headless.kvstore.svc:50051",
        3,
        "one",
    )
    args = parse_args(["--replication", "1", "--write-ack", "all"], environ=env)  # flags win
    assert (args.replication, args.write_ack) == (1, "all")


@pytest.mark.parametrize(
    "env", [{"KVSTORE_REPLICATION": "two"}, {"KVSTORE_REPLICATION": "0"}, {"KVSTORE_WRITE_ACK": "quorum"}]
)
def test_demo_rejects_bad_cluster_settings(env: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        parse_args([], environ=env)


def test_worker_config_checks_the_store_target_and_replication() -> None:
    from transfer.replicas.membership import InvalidTarget
    from workers.prefill import WorkerConfig

    WorkerConfig(store_target="a:1,b:2", replication=2, write_ack="one")
    with pytest.raises(InvalidTarget, match="more than once"):
        WorkerConfig(store_target="a:1,a:1")
    with pytest.raises(ValueError, match="replication"):
        WorkerConfig(store_target="a:1,b:2", replication=0)
    with pytest.raises(ValueError, match="write_ack"):
        WorkerConfig(store_target="a:1,b:2", write_ack="some")


def test_demo_pins_roles_on_a_local_ray_by_advertising_the_resources() -> None:
    args = parse_args(["--pin-roles", "--num-cpus", "3", "--decode-workers", "2"], environ={})
    assert ray_options(args) == {"num_cpus": 3, "resources": {"prefill": 1.0, "decode": 2.0}}


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--num-cpus", "2"], {"RAY_ADDRESS": "auto"}),  # Ray refuses num_cpus when joining
        (["--num-cpus", "2", "--ray-address", "auto"], {}),
        (["--store-dir", "/tmp/x"], {"KVSTORE_TARGET": "h:1"}),  # no in-process store to put it in
        (["--num-cpus", "0"], {}),
        (["--cpus-per-actor", "0"], {}),
    ],
)
def test_demo_rejects_flags_that_do_not_fit_the_mode(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, environ=env)


def test_a_bad_codec_profile_fails_at_configuration_not_at_the_first_encode(capsys) -> None:
    from workers.prefill import PrefillRequest, WorkerConfig

    WorkerConfig(store_target="a:1", profile="balanced")
    with pytest.raises(ValueError, match=r"profile 'lossy' is not a codec profile; choose one of"):
        WorkerConfig(store_target="a:1", profile="lossy")
    with pytest.raises(ValueError, match=r"request 'r1': profile 'lossy'"):
        PrefillRequest("r1", (1, 2, 3), profile="lossy")
    with pytest.raises(SystemExit):
        parse_args(["--profiles", "lossless,lossy"], environ={})
    assert "--profiles: 'lossy' is not a codec profile" in capsys.readouterr().err
