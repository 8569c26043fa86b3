"""The compose model (hyperrun/cli/compose_file.py): a file parsed, checked
and resolved, with no daemon."""
from pathlib import Path

import pytest

from hyperrun.cli.compose_file import ComposeError, duration, load


def project(tmp_path: Path, text: str, env: dict | None = None, name: str | None = None,
            files: dict[str, str] | None = None):
    for rel, content in (files or {}).items():
        (tmp_path / rel).write_text(content)
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    return load(path, name, environ=env or {})


BLOG = """
services:
  web:
    image: ${REG:-localhost:5000}/web:1
    command: nginx -g 'daemon off;'
    ports: ["8080:80", {target: 443, published: 8443, host_ip: 127.0.0.1}]
    volumes: [./conf:/etc/nginx/conf.d:ro, {type: volume, source: data, target: /data}]
    depends_on:
      app: {condition: service_healthy}
    restart: unless-stopped
  app:
    image: app
    entrypoint: [php-fpm, -F]
    environment: {DB: db, DEBUG: true, FROM_ENV: null, UNSET: null}
    env_file: app.env
    depends_on: [db]
    healthcheck:
      test: php -v
      interval: 1m30s
      timeout: 500ms
      start_period: 2s
  db:
    image: db
    volumes: ["data:/var/lib/mysql"]
    healthcheck: {test: [CMD, mysqladmin, ping], retries: 5}
volumes:
  data:
x-note: ignored
"""


def test_a_project_resolved(tmp_path):
    p = project(tmp_path, BLOG, env={"FROM_ENV": "yes"},
                files={"app.env": "# comment\nDB=from-file\nPASS='s3cret'\n"})
    assert p.name == tmp_path.name.lower()
    web, app, db = p.services["web"], p.services["app"], p.services["db"]
    assert web.image == "localhost:5000/web:1"
    assert web.command == ["nginx", "-g", "daemon off;"]
    assert web.ports == ["8080:80", "127.0.0.1:8443:443/tcp"]
    assert [(v.source, v.target, v.kind, v.readonly) for v in web.volumes] == [
        (str(tmp_path / "conf"), "/etc/nginx/conf.d", "bind", True),
        ("data", "/data", "volume", False)]
    assert web.depends_on == {"app": "service_healthy"} and web.restart == "unless-stopped"
    assert app.entrypoint == ["php-fpm", "-F"]
    # environment wins over env_file; a name with no value is the caller's, or left out
    assert app.environment == ["PASS=s3cret", "DB=db", "DEBUG=true", "FROM_ENV=yes"]
    hc = app.healthcheck
    assert (hc.test, hc.interval_s, hc.timeout_s, hc.retries, hc.start_period_s) == (
        ["/bin/sh", "-c", "php -v"], 90.0, 0.5, 3, 2.0)
    assert db.healthcheck.test == ["mysqladmin", "ping"] and db.healthcheck.retries == 5
    assert app.depends_on == {"db": "service_started"}
    assert p.order() == ["db", "app", "web"]
    assert p.order(["app"]) == ["db", "app"]
    assert p.container_name("db") == f"{p.name}-db-1" and p.volume_name("data") == f"{p.name}_data"


def test_project_name_from_option_then_file_then_directory(tmp_path):
    d = tmp_path / "My.Blog"
    d.mkdir()
    assert project(d, "services: {a: {image: x}}").name == "myblog"
    assert project(d, "name: named\nservices: {a: {image: x}}").name == "named"
    assert project(d, "name: named\nservices: {a: {image: x}}", name="opt").name == "opt"


def test_dotenv_beside_the_file_and_the_environment_over_it(tmp_path):
    text = "services: {a: {image: '${IMG}:${TAG-latest}', command: echo $$HOME}}"
    p = project(tmp_path, text, env={"IMG": "busybox"}, files={".env": "IMG=other\nTAG=1\n"})
    assert p.services["a"].image == "busybox:1"
    assert p.services["a"].command == ["echo", "$HOME"]


@pytest.mark.parametrize("text, message", [
    ("services: {web: {image: x, build: .}}", "services.web.build: not supported"),
    ("services: {web: {image: x}}\nnetworks: {}", "networks: not supported"),
    ("services: {web: {build: .}}", "services.web.build: not supported"),
    ("services: {web: {command: x}}", "services.web.image: needed"),
    ("services: {web: {image: x, ports: ['80']}}", "services.web.ports: '80': a host port"),
    ("services: {web: {image: x, volumes: ['/data']}}", "anonymous volumes are not supported"),
    ("services: {web: {image: x, volumes: ['data:/d']}}", "volume 'data' is not declared"),
    ("services: {web: {image: x, depends_on: [db]}}", "services.web.depends_on: no service 'db'"),
    ("services: {a: {image: x, depends_on: [b]}, b: {image: x, depends_on: [a]}}",
     "depends_on: a cycle: a -> b -> a"),
    ("services: {a: {image: x, depends_on: {b: {condition: service_completed_successfully}}},"
     " b: {image: x}}", "services.a.depends_on.b.condition: service_completed_successfully is "
     "not supported"),
    ("services: {a: {image: x, restart: sometimes}}", "services.a.restart: 'sometimes'"),
    ("services: {a: {image: x, healthcheck: {test: true}}}", "services.a.healthcheck.test"),
    ("services: {a: {image: x, healthcheck: {test: [CMD, x], interval: 5 s}}}",
     "services.a.healthcheck.interval: '5 s' is not a duration"),
    ("services: {a: {image: x, environment: [=x]}}", "services.a.environment"),
    ("services: {a: {image: '${NEED:?set it}'}}", "${NEED}: set it"),
    ("services: {a: {image: x}}\nvolumes: {d: {driver: nfs}}", "volumes.d.driver: not supported"),
    ("services: [a]", "services: a mapping"),
    ("- a", "a compose file is a mapping"),
    ("services: {a: {image: x, env_file: missing.env}}", "missing.env"),
])
def test_refused_with_the_key(tmp_path, text, message):
    with pytest.raises(ComposeError) as exc:
        project(tmp_path, text)
    assert message in str(exc.value)


def test_healthcheck_none_and_disable(tmp_path):
    p = project(tmp_path, "services: {a: {image: x, healthcheck: {test: [NONE]}},"
                          " b: {image: x, healthcheck: {disable: true}}}")
    assert p.services["a"].healthcheck is None and p.services["b"].healthcheck is None


def test_durations():
    assert duration("1h2m3s", "") == 3723 and duration("250ms", "") == 0.25
    assert duration(5, "") == 5.0
    with pytest.raises(ComposeError):
        duration("3 days", "x")
