"""What a run may ask the daemon's supervisor (api/supervisor.py) for, as
its request is checked on arrival."""
import pytest

from hyperrun.api.cli_server import container_spec, pod_spec
from hyperrun.api.supervisor import HEALTH_LABEL, RESTART_LABEL, check_healthcheck, check_policy
from hyperrun.cli_api import RunError, RunOptions


def test_policies():
    for policy in ("no", "always", "on-failure", "on-failure:3", "unless-stopped"):
        assert check_policy(policy) == policy
    for policy in ("sometimes", "always:2", "on-failure:x", ""):
        with pytest.raises(ValueError):
            check_policy(policy)


def test_healthchecks_get_defaults_and_bounds():
    assert check_healthcheck({"test": ["true"]}) == {
        "test": ["true"], "interval_s": 30.0, "timeout_s": 30.0, "retries": 3,
        "start_period_s": 0.0}
    assert check_healthcheck({"test": ["x"], "interval_s": 0, "retries": 0})["interval_s"] == 0.1
    for bad in ({}, {"test": []}, {"test": "true"}, {"test": ["x"], "retries": "3"},
                {"test": ["x"], "other": 1}, {"test": ["x"], "timeout_s": -1}):
        with pytest.raises(ValueError):
            check_healthcheck(bad)


def test_a_run_keeps_them_in_its_labels(tmp_path):
    opts = RunOptions("img", [], detach=True, restart="on-failure:2",
                      healthcheck={"test": ["true"], "interval_s": 1},
                      labels={"com.docker.compose.service": "web"})
    spec = container_spec(opts, pod_spec(opts, [], tmp_path), [])
    assert spec.labels[RESTART_LABEL] == "on-failure:2"
    assert '"interval_s": 1.0' in spec.labels[HEALTH_LABEL]
    assert spec.labels["com.docker.compose.service"] == "web"
    assert pod_spec(opts, [], tmp_path).labels["com.docker.compose.service"] == "web"
    for wrong in (RunOptions("img", [], restart="always"),
                  RunOptions("img", [], detach=True, remove=True, restart="always"),
                  RunOptions("img", [], detach=True, restart="later")):
        with pytest.raises(RunError):
            container_spec(wrong, pod_spec(wrong, [], tmp_path), [])
