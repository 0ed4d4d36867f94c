"""Partitioning on 8 forced CPU host devices (jax_na/sharding.py).

The device count can only be forced before jax starts its backend, which the rest of the session has
done by now (and ``jax_num_cpu_devices`` cannot be changed after that either), so the checks in
sharding_checks.py run once in a subprocess with XLA_FLAGS set; each test reports one of them.
"""

import fcntl
import json
import os
import subprocess
import sys
import tempfile

import pytest

import jax_na

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sharding_checks  # noqa: E402  (importing it starts no backend)

_TIMEOUT_S = 1200  # the checks take ~7 min on a 2-core machine


def _run_checks() -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    # the subprocess imports the same jax_na as this session
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(jax_na.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, HERE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py")], env=env,
                          capture_output=True, text=True, timeout=_TIMEOUT_S)
    status, log, chunk = {}, {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("JAX_NA_CHECK "):
            _, name, verdict, _seconds = line.split()
            status[name], log[name], chunk = verdict, "\n".join(chunk), []
        else:
            chunk.append(line)
    return dict(status=status, log=log, returncode=proc.returncode, stdout=proc.stdout[-8000:],
                stderr=proc.stderr[-8000:])


@pytest.fixture(scope="module")
def results():
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return _run_checks()
    # Under pytest-xdist every worker that takes one of the checks builds this fixture: the first
    # runs the subprocess (minutes), the others wait on the lock and read its results.
    path = os.path.join(tempfile.gettempdir(), f"jax_na_sharding_{run_id}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                json.dump(_run_checks(), f)
            os.replace(path + ".tmp", path)
        with open(path) as f:
            return json.load(f)


@pytest.mark.parametrize("name", list(sharding_checks.CHECKS))
def test_sharding(results, name):
    status, log = results["status"], results["log"]
    if name not in status:  # the subprocess died (e.g. an XLA check failure) before reaching it
        pytest.fail(f"check {name} did not run; exit status {results['returncode']}\n"
                    f"stdout:\n{results['stdout']}\nstderr:\n{results['stderr']}")
    assert status[name] == "PASS", f"{name} failed:\n{log[name]}"
