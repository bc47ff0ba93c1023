"""Sweep executors: ``--executor ray`` goes through the same code as a real cluster with a fake
``ray`` module (tasks pickled both ways, finishing in reverse order, a worker that dies), gives
the same records as the local executor (timings aside), streams them into the same store and
resumes the same way; resources per run; bad combinations and a missing Ray refused up front.
A real local Ray cluster (``ray.init(num_cpus=2)``) runs when Ray is installed (slow: worker
start-up)."""
from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest

from helpers import tiny_model_dir, words

from polyquant.cli import main
from polyquant.methods import METHODS, RTNConfig
from polyquant.methods.hqq import HQQConfig
from polyquant.report import execute
from polyquant.report.compare import Run, run_compare
from polyquant.report.executors import RAY_HINT, RayExecutor, make_executor

KW = dict(seqlen=16, max_windows=2, measure_speed=False, show_progress=False)
#: what may differ between two executions of one run
VOLATILE = {"timings", "started", "finished", "executor", "host", "versions"}
VOLATILE_METRICS = {"eval_seconds", "total_seconds", "speed_seconds", "peak_rss_bytes", "runtime_bytes"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory, seed=2, name="tiny")


@pytest.fixture(scope="module")
def text() -> str:
    return words(1000, seed=1)


def sweep() -> list[Run]:
    return [Run("fp32"), Run("w8", RTNConfig(bits=8, group_size=-1)), Run("w4", RTNConfig(bits=4, group_size=32)),
            Run("hqq", HQQConfig(bits=4, group_size=32))]


def stable(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k not in VOLATILE}
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in VOLATILE_METRICS}
    return out


class FakeRay(types.ModuleType):
    """The part of Ray's API the executor uses. Tasks run in this process on pickled copies of
    their arguments (as a worker would get them), and finish in reverse submission order."""

    def __init__(self, cpus: float = 2, gpus: float = 0, die: set[str] = frozenset()):
        super().__init__("ray")
        self.cpus, self.gpus, self.die = cpus, gpus, set(die)
        self.initialised = False
        self.inits: list[dict] = []
        self.options_seen: list[dict] = []
        self.cancelled: list = []
        self.shutdowns = 0
        self.objects: dict[int, object] = {}
        self.results: dict[int, object] = {}
        self.interrupt_after: int | None = None
        self.waits = 0

    def is_initialized(self):
        return self.initialised

    def init(self, address=None, **kw):
        self.initialised = True
        self.inits.append({"address": address, **kw})

    def shutdown(self):
        self.initialised = False
        self.shutdowns += 1

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}}]

    def put(self, obj):
        ref = ("obj", len(self.objects))
        self.objects[ref[1]] = pickle.dumps(obj)
        return ref

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                fake.options_seen.append(kw)
                return self

            def remote(self, *args):
                payload = pickle.dumps(args)  # what travels to the worker
                ref = ("task", len(fake.results))
                fake.results[ref[1]] = (fn, payload)
                return ref
        return Task()

    def wait(self, refs, num_returns=1):
        self.waits += 1
        if self.interrupt_after is not None and self.waits > self.interrupt_after:
            raise KeyboardInterrupt
        last = max(refs, key=lambda r: r[1])  # the last submitted finishes first
        return [last], [r for r in refs if r != last]

    def get(self, ref):
        fn, payload = self.results[ref[1]]
        args = [pickle.loads(self.objects[a[1]]) if isinstance(a, tuple) and a[0] == "obj" else a
                for a in pickle.loads(payload)]
        if args[1].name in self.die:
            raise RuntimeError("The worker died unexpectedly while executing this task (SIGKILL)")
        return pickle.loads(pickle.dumps(fn(*args)))  # the record travels back

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


@pytest.fixture
def fake_ray(monkeypatch):
    def make(**kw):
        fake = FakeRay(**kw)
        monkeypatch.setitem(sys.modules, "ray", fake)
        monkeypatch.setattr(execute, "_WORKER", {})  # a fresh worker process
        return fake
    return make


def test_ray_executor_same_records_as_local_streamed_and_resumed(tmp_path, tiny_dir, text, fake_ray):
    local = run_compare(tiny_dir, tmp_path / "local", sweep(), text=text, **KW)
    ray = fake_ray()
    out = tmp_path / "ray"
    res = run_compare(tiny_dir, out, sweep(), text=text, executor="ray", threads=1, **KW)
    assert ray.inits == [{"address": None, "include_dashboard": False, "log_to_driver": False}]
    assert ray.shutdowns == 1 and not ray.cancelled  # it started the cluster, so it stops it
    assert ray.options_seen == [{"num_cpus": 1.0, "num_gpus": 0.0, "max_retries": 1}] * 4
    assert [r["name"] for r in res["runs"]] == ["fp32", "w8", "w4", "hqq"]  # sweep order in results.json
    assert all(r["status"] == "ok" and r["executor"] == "ray" for r in res["runs"])
    lines = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["hqq", "w4", "w8", "fp32"]  # appended as they finished
    for a, b in zip(local["runs"], res["runs"]):
        assert stable(a) == stable(b), a["name"]  # identical metrics, sizes, kernels, keys
    assert res["runs"][2]["metrics"]["kl"] > res["runs"][1]["metrics"]["kl"] > 0

    # resume: a folder of either executor reuses every finished run, whichever executor reruns it
    ray2 = fake_ray()
    again = run_compare(tiny_dir, out, sweep(), text=text, executor="ray", **KW)
    assert ray2.options_seen == [] and ray2.inits == []  # nothing to run: no cluster started
    assert again["runs"] == res["runs"] and again["sweep"]["reused"] == 4
    assert run_compare(tiny_dir, out, sweep(), text=text, **KW)["runs"] == res["runs"]


def test_a_dead_worker_is_a_failed_run_retried_on_rerun_and_an_interrupt_cancels(tmp_path, tiny_dir, text,
                                                                                  fake_ray):
    out = tmp_path / "r"
    fake_ray(die={"w8"})
    res = run_compare(tiny_dir, out, sweep(), text=text, executor="ray", **KW)
    st = {r["name"]: r["status"] for r in res["runs"]}
    assert st == {"fp32": "ok", "w8": "failed", "w4": "ok", "hqq": "ok"}
    assert "worker died" in res["runs"][1]["error"]
    ray = fake_ray()
    res = run_compare(tiny_dir, out, sweep(), text=text, executor="ray", **KW)
    assert len(ray.options_seen) == 1 and all(r["status"] == "ok" for r in res["runs"])  # only w8 again
    ok = [json.loads(x)["name"] for x in (out / "runs.jsonl").read_text().splitlines()
          if json.loads(x)["status"] == "ok"]
    assert sorted(ok) == ["fp32", "hqq", "w4", "w8"]  # each run once

    # Ctrl-C while tasks are out: the ones not collected are cancelled, the collected one is kept
    out2 = tmp_path / "r2"
    ray = fake_ray()
    ray.interrupt_after = 1
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_dir, out2, sweep(), text=text, executor="ray", **KW)
    assert len(ray.cancelled) == 3 and ray.shutdowns == 1
    assert [json.loads(x)["name"] for x in (out2 / "runs.jsonl").read_text().splitlines()] == ["hqq"]


def test_resources_per_run_and_runs_that_do_not_fit_are_refused_before_any_task(tmp_path, tiny_dir, text,
                                                                                fake_ray, monkeypatch):
    ray = fake_ray(cpus=2)
    with pytest.raises(ValueError, match=r"run fp32 needs 3 CPU\(s\) and 0 GPU\(s\) on one node; the Ray cluster "
                                         r"has 2 CPU / 0 GPU"):
        run_compare(tiny_dir, tmp_path / "r", sweep()[:2], text=text, executor="ray", threads=1, eval_threads=3,
                    **KW)
    assert ray.options_seen == [] and ray.shutdowns == 1
    # a method whose quantization needs a GPU asks for one (and a cluster without one refuses it)
    monkeypatch.setitem(METHODS["hqq"].extra, "needs_gpu", True)
    job = execute.SweepJob("m", {"threads": 2, "eval_threads": None}, {})
    assert execute.run_resources(Run("hqq", HQQConfig()), job) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert execute.run_resources(Run("fp32"), job) == {"num_cpus": 2.0, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="run hqq needs 1 CPU"):
        run_compare(tiny_dir, tmp_path / "r", sweep(), text=text, executor="ray", **KW)
    # a cluster already initialised by the caller is used and left running; an address is passed on
    ray = fake_ray(gpus=1)
    ray.initialised = True
    run_compare(tiny_dir, tmp_path / "r", sweep()[:1], text=text, executor=RayExecutor(), **KW)
    assert ray.inits == [] and ray.shutdowns == 0
    ray = fake_ray()
    run_compare(tiny_dir, tmp_path / "r2", sweep()[:1], text=text, executor="ray", address="10.0.0.1:6379", **KW)
    assert ray.inits[0]["address"] == "10.0.0.1:6379"


def test_bad_executor_combinations_and_missing_ray_are_refused_up_front(tmp_path, tiny_dir, monkeypatch, capsys):
    with pytest.raises(ValueError, match="executor must be one of local, ray"):
        make_executor("dask")
    with pytest.raises(ValueError, match="address is for executor 'ray'"):
        make_executor("local", address="auto")
    with pytest.raises(ValueError, match="address must be a non-empty string"):
        RayExecutor(address=" ")
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    with pytest.raises(RuntimeError, match=r"pip install polyquant\[ray\]"):
        run_compare(tiny_dir, tmp_path / "x", [Run("fp32")], executor="ray", **KW)
    out = tmp_path / "o"
    assert main(["compare", str(tiny_dir), "-o", str(out), "--executor", "ray", "-q"]) == 2
    assert RAY_HINT in capsys.readouterr().err and not out.exists()
    assert main(["compare", str(tiny_dir), "-o", str(out), "--address", "auto", "-q"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_a_local_ray_cluster_gives_the_local_records(tmp_path, tiny_dir, text):
    ray = pytest.importorskip("ray")
    local = run_compare(tiny_dir, tmp_path / "local", sweep(), text=text, **KW)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_compare(tiny_dir, tmp_path / "ray", sweep(), text=text, executor="ray", **KW)
    finally:
        ray.shutdown()
    for a, b in zip(local["runs"], res["runs"]):
        assert stable(a) == stable(b), a["name"]
