"""Ray Tune PBT on a multi-node Ray cluster, with every checkpoint on S3.

The same population as ray_tune_pbt.py (a small torch model, Adam and the
reference VGS, full-state vgs_ckpt checkpoints), scaled out: a local Ray cluster of a
head and two worker nodes (ray.cluster_utils.Cluster: each node with its own
resources and temp dir, all on this machine), trials placed on the workers, and
RunConfig(storage_path="s3://...", storage_filesystem=...) on an S3 server.
Then, mid-run, the things that go wrong on a real cluster:

1. a worker node dies (--kill-node-at): its trials restart from their last
   checkpoints on S3 (FailureConfig(max_failures=...), so a lost node cannot
   stall the synchronous population), and a replacement node joins;
2. the driver is SIGKILLed (--kill-driver-at) and the experiment is resumed with
   Tuner.restore from S3.

Every report (and every restore) of every trial is also written as a small JSON
event to S3 (<storage>/events/): node, iteration, digest of the state saved,
and after a restore the digest restored and whether it was an exploit (cloned)
or a restart. At the end the events are checked: every restore restored exactly a
state its source trial saved, and no restart was counted as an exploit; the
summary shows on how many nodes the trials ran.

    pip install -e '.[ray,s3,test]'      # moto serves S3 on 127.0.0.1 when no --endpoint
    python examples/ray_cluster_pbt.py
    python examples/ray_cluster_pbt.py --endpoint http://127.0.0.1:9000 --bucket pbt

The driver runs as a subprocess of this script (driver sub-command), so that it
can be killed and restored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

# Every node of this cluster lives on this machine: make Ray resolve its own address to
# 127.0.0.1 (not to the network interface's), so nothing leaves loopback. (Ray reads
# this switch, named for single-machine platforms, in every process it starts.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ray_tune_pbt  # the trainable's model, training and digest

from vgs_ckpt.integrations import exit_without_extra

HERE = Path(__file__).resolve()
REGION = "eu-west-1"
EXPERIMENT = "vgs_ckpt_cluster_pbt"


# -- storage ----------------------------------------------------------------------------


def s3fs_options(endpoint: str) -> dict[str, Any]:
    """s3fs/fsspec options for the S3 server at ``endpoint`` (vgs_ckpt's storage_options)."""
    return {"key": "testing", "secret": "testing", "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION}}


def arrow_filesystem(endpoint: str) -> Any:
    """The pyarrow filesystem Ray Tune writes its storage with (``storage_filesystem``)."""
    from pyarrow import fs

    scheme, _, address = endpoint.partition("://")
    return fs.S3FileSystem(access_key="testing", secret_key="testing", region=REGION,
                           endpoint_override=address, scheme=scheme)


def write_event(events: str, options: dict[str, Any], event: dict[str, Any]) -> None:
    """One JSON object, committed whole to ``events/<trial>/<time>-<random>.json``."""
    from vgs_ckpt.storage import resolve

    key = f"{events}/{event['trial']}/{time.time():.6f}-{uuid.uuid4().hex[:8]}.json"
    storage, key = resolve(key, storage_options=options)
    data = json.dumps(event).encode()
    storage.commit(key, lambda f: f.write(data))


def read_events(events: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    from vgs_ckpt.storage import resolve

    storage, prefix = resolve(events, storage_options=options)
    found = []
    for info in storage.entries(prefix, recursive=True):
        if info.key.endswith(".json"):
            with storage.open(info.key) as source:
                found.append(json.loads(source.read(0, source.size())))
    return sorted(found, key=lambda e: e["time"])


# -- the trainable ----------------------------------------------------------------------


def trainable(config: dict[str, Any], events: str, options: dict[str, Any]) -> None:
    import ray
    import torch
    from ray import tune

    from vgs_ckpt.integrations import ray_tune

    torch.set_num_threads(1)
    trial = tune.get_context().get_trial_id()
    node = ray.get_runtime_context().get_node_id()
    learner = ray_tune_pbt.make_learner(config)
    restored = ray_tune.restore(config)
    lineage, iteration = None, 0
    if restored is not None:
        learner.set_parameters(restored.parameters)
        lineage, iteration = restored.lineage, restored.header.step
        write_event(events, options, {
            "kind": "restore", "trial": trial, "node": node, "time": time.time(),
            "source": restored.source.member_id, "source_iteration": restored.source.step,
            "file": restored.source.file, "cloned": restored.cloned,
            "restarted": restored.restarted, "digest": ray_tune_pbt.state_digest(learner),
            "config": {"lr": config["lr"], "vgs_alpha": config["vgs_alpha"]}})
    gen = torch.Generator().manual_seed(config.get("seed", 0) + iteration)
    while True:
        iteration += 1
        loss = ray_tune_pbt.train_iteration(learner, gen)
        digest = ray_tune_pbt.state_digest(learner)
        write_event(events, options, {"kind": "report", "trial": trial, "node": node,
                                      "time": time.time(), "iteration": iteration,
                                      "digest": digest, "loss": loss})
        ray_tune.report({"loss": loss, "iteration": iteration, "node": node},
                        learner.get_parameters(), step=iteration, config=config,
                        lineage=lineage, performance_metric="loss")


# -- the driver (a subprocess, so that it can be killed) --------------------------------


def driver(args: argparse.Namespace) -> int:
    import ray
    from ray import cloudpickle, tune
    from ray.tune.schedulers import PopulationBasedTraining

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(ray_tune_pbt)
    ray.init(address=args.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    storage = arrow_filesystem(args.endpoint)
    options = s3fs_options(args.endpoint)
    root = f"{args.bucket}/ray"
    events = f"s3://{args.bucket}/events"

    class Progress(tune.Callback):
        def on_trial_result(self, iteration: int, trials: Any, trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            print("PROGRESS " + json.dumps({"trial": trial.trial_id,
                                            "iteration": result.get("iteration"),
                                            "node": result.get("node")}), flush=True)

    function = tune.with_resources(tune.with_parameters(trainable, events=events,
                                                        options=options), {"cpu": 1})
    if args.restore:
        tuner = tune.Tuner.restore(f"{root}/{EXPERIMENT}", function, resume_errored=True,
                                   storage_filesystem=storage)
    else:
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=args.interval,
            hyperparam_mutations={"lr": tune.loguniform(1e-4, 1e-1),
                                  "vgs_alpha": [0.05, 0.1, 0.2, 0.4]},
            # Asynchronous (Ray's default): a trial exploits when it reaches the interval.
            # The synchronous variant waits for every trial at each interval; after a
            # Tuner.restore of a driver killed mid-interval it was seen here to wait
            # forever (Ray 2.60: "No trial is running and no new trial has been
            # started"), trials being at different iterations.
            quantile_fraction=0.5, resample_probability=0.25, synch=False)
        tuner = tune.Tuner(
            function,
            param_space={"lr": tune.loguniform(1e-4, 1e-1), "vgs_alpha": 0.1,
                         "seed": tune.randint(0, 1000)},
            tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                        num_samples=args.samples),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=root, storage_filesystem=storage,
                stop={"training_iteration": args.iterations}, verbose=0,
                callbacks=[Progress()],
                # Upload the experiment state often: a restored driver resumes each
                # trial from the checkpoint that state names (Ray's default is 5 min).
                sync_config=tune.SyncConfig(sync_period=1),
                # A lost node must not stall the synchronous population: its trials
                # restart from their last checkpoints (on S3) elsewhere.
                failure_config=tune.FailureConfig(max_failures=3)))
    results = tuner.fit()
    errors = [str(r.error)[:200] for r in results if r.error is not None]
    print("DONE " + json.dumps({"trials": len(results), "errors": errors}), flush=True)
    return 1 if errors else 0


# -- the scenario -----------------------------------------------------------------------


def start_cluster(workers: int, cpus: int, temp_root: str) -> tuple[Any, list[Any]]:
    """A head (no CPUs: trials go to the workers) and ``workers`` worker nodes, each
    with ``cpus`` CPUs and its own temp dir, all on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    nodes = [add_worker(cluster, cpus, temp_root) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def add_worker(cluster: Any, cpus: int, temp_root: str) -> Any:
    return cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1",
                            temp_dir=tempfile.mkdtemp(prefix="node-", dir=temp_root))


def _driver_process(args: argparse.Namespace, address: str, restore: bool
                    ) -> subprocess.Popen[str]:
    command = [sys.executable, str(HERE), "driver", "--address", address,
               "--endpoint", args.endpoint, "--bucket", args.bucket,
               "--samples", str(args.samples), "--iterations", str(args.iterations),
               "--interval", str(args.interval)] + (["--restore"] if restore else [])
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AIR_NEW_OUTPUT": "0",
           "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Cluster, driver, a node death, a driver death and a restore; the outcome."""
    temp_root = tempfile.mkdtemp(prefix="vgs_ckpt-cluster-")
    cluster, workers = start_cluster(2, args.cpus_per_node, temp_root)
    log: list[str] = []
    try:
        process = _driver_process(args, cluster.address, restore=False)
        killed_node = killed_driver = False
        times: dict[str, float] = {}
        assert process.stdout is not None
        for line in process.stdout:
            log.append(line.rstrip())
            if args.verbose or not line.startswith("PROGRESS "):
                print(f"[driver] {line.rstrip()}", flush=True)
            if not line.startswith("PROGRESS "):
                continue
            progress = json.loads(line[len("PROGRESS "):])
            iteration = progress.get("iteration") or 0
            if not killed_node and iteration >= args.kill_node_at:
                print(f"[scenario] removing worker node {workers[0].node_id[:8]} "
                      f"(a trial reached iteration {iteration})", flush=True)
                times["node_killed"] = time.time()
                cluster.remove_node(workers[0], allow_graceful=False)
                workers.append(add_worker(cluster, args.cpus_per_node, temp_root))
                killed_node = True
            elif killed_node and not killed_driver and iteration >= args.kill_driver_at:
                print(f"[scenario] SIGKILL of the driver (iteration {iteration})", flush=True)
                times["driver_killed"] = time.time()
                process.send_signal(signal.SIGKILL)
                killed_driver = True
                break
        process.wait()
        if killed_driver:
            time.sleep(2)  # the killed driver's trials go with it
            print("[scenario] Tuner.restore from S3", flush=True)
            process = _driver_process(args, cluster.address, restore=True)
            assert process.stdout is not None
            for line in process.stdout:
                log.append(line.rstrip())
                if args.verbose or not line.startswith("PROGRESS "):
                    print(f"[driver] {line.rstrip()}", flush=True)
            process.wait()
        done = [json.loads(line[5:]) for line in log if line.startswith("DONE ")]
        return {"returncode": process.returncode, "killed_node": killed_node,
                "killed_driver": killed_driver, "times": times,
                "done": done[-1] if done else None}
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        cluster.shutdown()


def check(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the events show; raises AssertionError on a broken promise."""
    reports = [e for e in events if e["kind"] == "report"]
    restores = [e for e in events if e["kind"] == "restore"]
    saved: dict[tuple[str, int], set[str]] = {}
    for e in reports:
        saved.setdefault((e["trial"], e["iteration"]), set()).add(e["digest"])
    exploits = [r for r in restores if r["cloned"]]
    for r in restores:  # every restore restored exactly a state its source saved
        assert r["digest"] in saved.get((r["source"], r["source_iteration"]), set()), (
            f"trial {r['trial']} restored {r['file']} with digest {r['digest'][:12]}, which "
            f"{r['source']} never saved at iteration {r['source_iteration']}")
        assert r["cloned"] == (r["source"] != r["trial"] and not r["restarted"])
    # A second exploit of one checkpoint comes with a newly explored config; the same
    # checkpoint and config again is a restart, which must not count.
    counted = Counter((r["trial"], r["file"], json.dumps(r["config"], sort_keys=True))
                      for r in exploits)
    twice = [key for key, n in counted.items() if n > 1]
    assert not twice, f"a restart was counted as another exploit: {twice}"
    return {"trials": len({e["trial"] for e in reports}),
            "nodes": len({e["node"] for e in reports}),
            "reports": len(reports), "exploits": len(exploits),
            "restarts": sum(1 for r in restores if not r["cloned"]),
            "restarts_of_cloned_checkpoints": sum(1 for r in restores if r["restarted"]),
            "max_iteration": max((e["iteration"] for e in reports), default=0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "driver"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start moto on "
                        "127.0.0.1)")
    parser.add_argument("--bucket", default=None, help="bucket (default: a new one)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--interval", type=int, default=2, help="PBT perturbation interval")
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--kill-node-at", type=int, default=3, metavar="ITERATION")
    parser.add_argument("--kill-driver-at", type=int, default=6, metavar="ITERATION")
    parser.add_argument("--summary", help="write the outcome as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show every trial result")
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--restore", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "driver":
        return driver(args)
    what = "examples/ray_cluster_pbt.py"
    exit_without_extra("ray", "ray", what=what)
    exit_without_extra("s3", "s3fs", what=what)
    if args.endpoint is None:
        exit_without_extra("test", "moto", what=f"{what} without --endpoint")
    server = None
    if args.endpoint is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        args.endpoint = f"http://{host}:{port}"
    if args.bucket is None:
        import s3fs

        args.bucket = f"pbt-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(**s3fs_options(args.endpoint)).mkdir(args.bucket)
    try:
        outcome = scenario(args)
        outcome["events"] = check(read_events(f"s3://{args.bucket}/events",
                                              s3fs_options(args.endpoint)))
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(outcome, indent=2))
    if args.summary:
        Path(args.summary).write_text(json.dumps(outcome, indent=2))
    return 0 if outcome["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
