"""Partitioning on 8 forced CPU host devices (jax_na/sharding.py).

The device count can only be forced before jax starts its backend, which the rest of the session has
done by now (and ``jax_num_cpu_devices`` cannot be changed after that either), so the checks in
sharding_checks.py run once in a subprocess with XLA_FLAGS set; each test reports one of them.
"""

import os
import subprocess
import sys

import pytest

import jax_na

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sharding_checks  # noqa: E402  (importing it starts no backend)

_TIMEOUT_S = 1200  # the checks take ~7 min on a 2-core machine


@pytest.fixture(scope="module")
def results():
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
    return status, log, proc


# One xdist worker takes every check (tools/test.sh: --dist loadgroup): the module-scoped fixture
# would otherwise run the subprocess once per worker.
@pytest.mark.xdist_group("sharding")
@pytest.mark.parametrize("name", list(sharding_checks.CHECKS))
def test_sharding(results, name):
    status, log, proc = results
    if name not in status:  # the subprocess died (e.g. an XLA check failure) before reaching it
        pytest.fail(f"check {name} did not run; exit status {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-8000:]}\nstderr:\n{proc.stderr[-8000:]}")
    assert status[name] == "PASS", f"{name} failed:\n{log[name]}"
