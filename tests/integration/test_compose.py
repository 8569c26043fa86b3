"""`hyperrun compose` end to end: examples/blog (nginx -> php-fpm -> MariaDB,
each service in its own VM on the CNI network) up with one command
against an image the test builds from Debian's packages; the page, a post
added through it, a re-created database found again by its name, Docker's
file limit in the containers, and nothing left on the host after `down`
(issue 17); two projects, each on a network of its own that the other's
pods cannot reach, and that `down` removes."""
import ipaddress
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.framework import Cli, qemu_pids, wait_until
from tests.conftest import REPORTS
from tests.framework.host import host_links, iptables_state, network_state, state_diff

pytestmark = pytest.mark.vm
BLOG = Path(__file__).resolve().parents[2] / "examples" / "blog"
BRIDGE = "hrpod0"  # the default CNI network's (framework/cni.py)
PORT = 18950


def page(timeout: float = 120) -> str:
    """The blog's page once it lists posts (nginx, php-fpm and MariaDB up)."""
    def get():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=30) as r:
                body = r.read().decode()
                return body if 'class="title"' in body else None
        except OSError:
            return None
    return wait_until(get, timeout, "the blog's page with its posts", interval=0.5)


def titles(body: str) -> list[str]:
    return re.findall(r'<h2 class="title">(.*?)</h2>', body)


def test_blog_up_post_recreate_db_down(netd, cni_env, pushed, blog_image):
    d, leases = netd, cni_env[1]
    env = {**d.cli.env, "BLOG_IMAGE": blog_image, "BLOG_PORT": str(PORT)}
    cli = Cli(env, check=True)
    compose = ("compose", "-f", str(BLOG / "compose.yaml"))
    d.warm_up(pushed.ref("busybox:latest"))  # the plugins' shared chains, which stay
    before = network_state(leases, BRIDGE)
    cli("pull", "-q", blog_image, timeout=600)

    began = time.monotonic()
    up = cli(*compose, "up", "-d", timeout=1200)
    up_s = time.monotonic() - began
    report = REPORTS.setdefault("examples/blog: compose up -d, and each VM's PSS", [])
    report.append(f"compose up -d (3 VMs, image pulled before): {up_s:.1f} s")
    print(up.stderr.decode())
    body = page()
    assert titles(body) == ["Hello from MariaDB"], body

    # A post added through the page's form appears on it.
    form = urllib.parse.urlencode({"title": "Added through the page", "body": "hi"}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", data=form, timeout=60) as r:
        assert titles(r.read().decode()) == ["Added through the page", "Hello from MariaDB"]

    ps = cli(*compose, "ps").stdout.decode()
    print(ps)
    assert re.search(r"blog-db-1 .* db +Up .*\(healthy\)", ps), ps
    assert f"0.0.0.0:{PORT}->80/tcp" in ps
    stats = cli("stats", timeout=120).stdout.decode()
    report += stats.splitlines()
    for service in ("nginx", "php", "db"):
        assert f"blog-{service}-1" in stats

    # Docker's file limit, and MariaDB has what it asks for.
    assert cli(*compose, "exec", "-T", "db", "sh", "-c", "ulimit -n; ulimit -Hn"
               ).stdout == b"1048576\n1048576\n"
    db_log = cli(*compose, "logs", "db").stdout.decode()
    assert "ready for connections" in db_log, db_log
    assert "max_open_files" not in db_log, db_log
    assert "io_uring_queue_init() failed" not in db_log, db_log
    assert "InnoDB: Using io_uring" in db_log, db_log  # the guest kernel has it (issue 17)

    # Services by name (and containers by theirs), as they are now.
    def resolved(name: str) -> str:
        out = cli(*compose, "exec", "-T", "php", "getent", "hosts", name).stdout.decode()
        return out.split()[0]
    db_ip = resolved("db")
    assert resolved("blog-db-1") == db_ip

    # The database re-created: a new VM and address, its data on the volume;
    # the page finds it by its name with no edits.
    (old,) = json.loads(cli("inspect", "blog-db-1").stdout)
    cli(*compose, "up", "-d", "--force-recreate", "db", timeout=1200)
    (new,) = json.loads(cli("inspect", "blog-db-1").stdout)
    assert new["Id"] != old["Id"] and new["VM"]["Pid"] != old["VM"]["Pid"]
    assert resolved("db") == new["NetworkSettings"]["IPAddress"]
    report.append(f"db re-created: {db_ip} -> {new['NetworkSettings']['IPAddress']}")
    assert titles(page(300)) == ["Added through the page", "Hello from MariaDB"]

    cli(*compose, "down", timeout=300)
    assert cli(*compose, "ps", "-a").stdout.decode().splitlines()[1:] == []
    wait_until(lambda: not qemu_pids(d.run_dir), 30, "no VM of the project left")
    after = network_state(leases, BRIDGE)
    assert after == before, state_diff(before, after)


def test_health_restart_and_names_per_project(netd, pushed, tmp_path):
    """depends_on service_healthy waits for the daemon's health check; a
    restart policy makes an exited container again; a service's name
    answers in its own project only, a container's name everywhere."""
    image = pushed.ref("busybox:latest")
    cli = Cli(netd.cli.env, check=True)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "compose.yaml").write_text(f"""
services:
  web:
    image: {image}
    command: sh -c "mkdir -p /www && echo web > /www/index.html && exec httpd -f -p 80 -h /www"
    healthcheck: {{test: [CMD, wget, -qO-, http://127.0.0.1/], interval: 1s, retries: 3}}
  client:
    image: {image}
    command: sleep 600
    depends_on: {{web: {{condition: service_healthy}}}}
  flaky:
    image: {image}
    command: sh -c "echo ran; exit 3"
    restart: on-failure:2
""")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "compose.yaml").write_text(f"""
services:
  client:
    image: {image}
    command: sleep 600
""")
    one = ("compose", "-f", str(tmp_path / "one" / "compose.yaml"))
    two = ("compose", "-f", str(tmp_path / "two" / "compose.yaml"))
    up = cli(*one, "up", "-d", timeout=600).stderr.decode()
    assert up.index("one-web-1  Healthy") < up.index("one-client-1  Creating"), up
    assert re.search(r"one-web-1 .* web +Up .*\(healthy\)", cli(*one, "ps").stdout.decode())
    cli(*two, "up", "-d", timeout=600)

    (web,) = json.loads(cli("inspect", "one-web-1").stdout)
    web_ip = web["NetworkSettings"]["IPAddress"]
    lookup = "nslookup {} | grep -A1 '^Name:' | grep Address | sed 's/.* //'"
    assert cli(*one, "exec", "-T", "client", "sh", "-c", lookup.format("web")
               ).stdout.decode() == f"{web_ip}\n"
    assert cli(*one, "exec", "-T", "client", "wget", "-qO-", "http://web/").stdout == b"web\n"
    assert cli(*two, "exec", "-T", "client", "sh", "-c", lookup.format("one-web-1")
               ).stdout.decode() == f"{web_ip}\n"
    r = cli(*two, "exec", "-T", "client", "nslookup", "web", check=False)
    assert r.returncode != 0, r  # project one's service, not two's

    # Each project its own network: subnets apart, and no way across.
    (other,) = json.loads(cli("inspect", "two-client-1").stdout)
    other_ip = other["NetworkSettings"]["IPAddress"]
    assert ipaddress.ip_network(f"{web_ip}/24", strict=False) != \
        ipaddress.ip_network(f"{other_ip}/24", strict=False), (web_ip, other_ip)
    get = ("timeout", "5", "wget", "-qO-", f"http://{web_ip}/")  # wget -T: SIGSEGV here
    assert cli(*one, "exec", "-T", "client", *get).stdout == b"web\n"
    r = cli(*two, "exec", "-T", "client", *get, check=False)
    assert r.returncode != 0 and r.stdout == b"", r  # project one's web, from project two
    networks = project_networks(netd)
    assert sorted(n["project"] for n in networks.values()) == ["one", "two"], networks
    assert {n["bridge"] for n in networks.values()} <= host_links()

    def flaky():
        (info,) = json.loads(cli("inspect", "one-flaky-1").stdout)
        return info["Config"]["Labels"].get("io.hyperrun.restarts") == "2" and \
            not info["State"]["Running"] and info
    info = wait_until(flaky, 120, "flaky restarted twice, then left exited")
    assert info["State"]["ExitCode"] == 3
    assert "one-flaky-1  | ran\n" in cli(*one, "logs").stdout.decode()

    # A restarted daemon checks its containers' health again.
    netd.stop()
    netd.start()
    wait_until(lambda: re.search(r"one-web-1 .*\(healthy\)", cli(*one, "ps").stdout.decode()),
               60, "web healthy again after the daemon's restart")

    for project in (one, two):
        cli(*project, "down", timeout=300)
    wait_until(lambda: not qemu_pids(netd.run_dir), 30, "no VM left")
    # Nothing of the projects' networks left: bridges, rules, leases, configs.
    assert project_networks(netd) == {}
    assert not {n["bridge"] for n in networks.values()} & host_links()
    rules = iptables_state()
    for name, n in networks.items():
        assert n["bridge"] not in rules and n["subnet"].rsplit(".", 1)[0] + "." not in rules
        root = Path(netd.env["HYPERRUN_ROOT"]) / "networks"
        assert not (root / "ipam" / name).exists() and not (root / f"{name}.conflist").exists()


def project_networks(d) -> dict:
    """The daemon's record of its projects' networks (network/projects.py)."""
    path = Path(d.env["HYPERRUN_ROOT"]) / "networks" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_up_attached_follows_the_output_and_ctrl_c_stops(netd, pushed, tmp_path):
    """`compose up` without -d: the services' lines after their container's
    name, until Ctrl-C, which stops them (as docker compose's)."""
    import signal
    import subprocess

    (tmp_path / "compose.yaml").write_text(f"""
name: attached
services:
  talker:
    image: {pushed.ref("busybox:latest")}
    command: sh -c "echo hello; trap 'exit 0' TERM; while true; do sleep 0.1; done"
""")
    cli = Cli(netd.cli.env, check=True)
    up = cli.popen("compose", "-f", str(tmp_path / "compose.yaml"), "up",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert up.stdout.readline() == b"attached-talker-1 | hello\n"
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 130
    ps = cli("compose", "-f", str(tmp_path / "compose.yaml"), "ps", "-a").stdout.decode()
    assert re.search(r"attached-talker-1 .* Exited \(0\)", ps), ps
    cli("compose", "-f", str(tmp_path / "compose.yaml"), "down")
