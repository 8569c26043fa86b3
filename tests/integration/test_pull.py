"""Pulling from real registries (Debian's docker-registry on 127.0.0.1),
with images made by umoci/skopeo; a fake registry only for what a real one
will not serve (a wrong media type, a lying digest header, bearer tokens)."""
from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import tarfile
import time

import pytest

from hyperrun.image import distribution as dist
from hyperrun.image.auth import Credentials, docker_credentials, parse_challenge
from hyperrun.image.distribution import (OCI_INDEX, OCI_MANIFEST, DigestMismatch, NotFoundError,
                                         PlatformNotFound, PullError, RegistryUnreachable,
                                         TLSVerifyError, TruncatedBlob, UnauthorizedError,
                                         UnsupportedMediaType, pull)
from hyperrun.image.hosts import Hosts, HostsConfigError, is_loopback
from hyperrun.image.reference import InvalidReference, parse
from hyperrun.image.store import ContentStore
from hyperrun.sample_images import (Layout, basic_auth_entry, build_random, docker_config,
                                    free_port)
from tests.registry import FakeRegistry, TCPProxy

NO_HOSTS = Hosts()   # tests do not depend on this machine's registries.toml


def do_pull(ref, store, **kw):
    kw.setdefault("hosts", NO_HOSTS)
    kw.setdefault("progress", False)
    return asyncio.run(pull(ref, store, **kw))


def blob_files(store: ContentStore) -> set[str]:
    return {p.name for p in (store.root / "blobs" / "sha256").iterdir()}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and text, text
    assert "Traceback" not in text
    return text


@pytest.fixture
def store(tmp_path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.fixture(autouse=True)
def _no_docker_config(tmp_path, monkeypatch):
    """No test reads the real ~/.docker/config.json."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def layer_file(store: ContentStore, digest: str, name: str) -> bytes | None:
    with tarfile.open(store.path(digest)) as tar:
        try:
            return tar.extractfile(name).read()
        except KeyError:
            return None


# ------------------------------------------------------------------ references

@pytest.mark.parametrize("text,expected,key", [
    ("busybox", "docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
    ("user/app:1", "docker.io/user/app:1", "docker.io/user/app:1"),
    ("docker.io/busybox", "docker.io/library/busybox:latest", None),
    ("index.docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36", None),
    ("localhost:5000/x", "localhost:5000/x:latest", None),
    ("localhost/x", "localhost/x:latest", None),
    ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", None),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9", None),
    ("[::1]:5000/x:y", "[::1]:5000/x:y", None),
    ("x@sha256:" + "a" * 64, "docker.io/library/x@sha256:" + "a" * 64,
     "docker.io/library/x@sha256:" + "a" * 64),
    ("x:tag@sha256:" + "b" * 64, "docker.io/library/x:tag@sha256:" + "b" * 64,
     "docker.io/library/x:tag"),
    ("a.b/c__d/e-f.g:V1.2_x", "a.b/c__d/e-f.g:V1.2_x", None),
])
def test_reference_normalized(text, expected, key):
    ref = parse(text)
    assert str(ref) == expected
    if key:
        assert ref.key == key
    assert parse(str(ref)) == ref


def test_reference_parts():
    ref = parse("registry.k8s.io/pause:3.9")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "registry.k8s.io", "pause", "3.9", None)
    assert parse("busybox").familiar == "busybox:latest"
    d = "sha256:" + "c" * 64
    by_digest = parse(f"127.0.0.1:5000/a@{d}")
    assert by_digest.tag is None and by_digest.target == d
    assert by_digest.key == f"127.0.0.1:5000/a@{d}"


@pytest.mark.parametrize("text,message", [
    ("Busybox", "must be lowercase"),
    ("User/app", "must be lowercase"),
    ("example.com/Foo/bar", "must be lowercase"),
    ("x:-bad", "bad tag"),
    ("x:" + "a" * 129, "bad tag"),
    ("x:", "bad tag"),
    ("x@sha256:abc", "bad digest"),
    ("x@sha256:" + "A" * 64, "bad digest"),
    ("x@md5:" + "a" * 32, "unsupported digest algorithm"),
    ("x@", "bad digest"),
    ("a//b", "bad repository name"),
    ("a/b_", "bad repository name"),
    ("", "empty"),
    ("busy box", "whitespace"),
    ("-host.com/x", "bad registry name"),
])
def test_reference_invalid(text, message):
    with pytest.raises(InvalidReference, match=message):
        parse(text)


# ------------------------------------------------------------------ hosts and credentials

def test_hosts_config(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    path = tmp_path / "registries.toml"
    path.write_text(f'''
[[registry]]
prefix = "docker.io"
mirrors = ["http://127.0.0.1:5000", "mirror.example.com", {{ url = "https://m2.example", ca = "{ca}" }}]

[[registry]]
prefix = "docker.io/library/special"
mirrors = ["https://special.example/v2"]

[[registry]]
prefix = "internal.example:5000"
insecure = true

[[registry]]
prefix = "mirror.example.com"
ca = "ca.pem"
''')
    hosts = Hosts.load(path)
    eps = hosts.endpoints(parse("busybox"))
    assert [(e.host, e.schemes, e.mirror) for e in eps] == [
        ("127.0.0.1:5000", ("http",), True),
        ("mirror.example.com", ("https",), True),
        ("m2.example", ("https",), True),
        ("registry-1.docker.io", ("https",), False)]
    assert eps[1].ca == ca and eps[2].ca == ca       # own entry, relative to the file; inline
    special = hosts.endpoints(parse("special"))
    assert [(e.host, e.path) for e in special] == [("special.example", ""),
                                                   ("registry-1.docker.io", "")]
    internal = hosts.endpoints(parse("internal.example:5000/x"))[0]
    assert internal.schemes == ("https", "http") and not internal.verify_tls
    local = NO_HOSTS.endpoints(parse("127.0.0.1:5000/x"))[0]
    assert local.schemes == ("https", "http") and local.verify_tls
    assert NO_HOSTS.endpoints(parse("quay.io/x"))[0].schemes == ("https",)


@pytest.mark.parametrize("host,loop", [("127.0.0.1:5000", True), ("127.1.2.3", True),
                                       ("localhost:80", True), ("[::1]:5000", True),
                                       ("::1", True), ("10.0.0.1:5000", False),
                                       ("example.com", False)])
def test_loopback(host, loop):
    assert is_loopback(host) is loop


@pytest.mark.parametrize("text,message", [
    ("registry = 1", "array of tables"),
    ("[[registry]]\nprefix = 'a'\nmirror = ['x']", "unknown key"),
    ("[[registry]]\nmirrors = ['x']", "'prefix'"),
    ("[[registry]]\nprefix = 'a'\nmirrors = ['ftp://x']", "bad mirror URL"),
    ("[[registry]]\nprefix = 'a'\ninsecure = 'yes'", "true or false"),
    ("[[registry]]\nprefix = 'a'\nca = '/nonexistent/ca.pem'", "does not exist"),
    ("[[registry", "invalid TOML"),
])
def test_hosts_config_errors(tmp_path, text, message):
    path = tmp_path / "registries.toml"
    path.write_text(text)
    with pytest.raises(HostsConfigError, match=message) as e:
        Hosts.load(path)
    assert str(path) in str(e.value)


def test_hosts_default_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERRUN_REGISTRIES", str(tmp_path / "missing.toml"))
    with pytest.raises(HostsConfigError, match="does not exist"):
        Hosts.load()
    (tmp_path / "r.toml").write_text('[[registry]]\nprefix = "docker.io"\n'
                                     'mirrors = ["http://127.0.0.1:1"]\n')
    monkeypatch.setenv("HYPERRUN_REGISTRIES", str(tmp_path / "r.toml"))
    assert Hosts.load().endpoints(parse("busybox"))[0].host == "127.0.0.1:1"


def test_docker_config_credentials(tmp_path, monkeypatch):
    cfg = tmp_path / "docker"
    docker_config(cfg, {
        "https://index.docker.io/v1/": basic_auth_entry("hubuser", "hubpw"),
        "127.0.0.1:5000": {"username": "u", "password": "p:w"},
        "http://other.example:8443/v2/": basic_auth_entry("o", "pw"),
        "tok.example": {"identitytoken": "refresh"},
    })
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    assert docker_credentials("docker.io") == Credentials("hubuser", "hubpw")
    assert docker_credentials("127.0.0.1:5000") == Credentials("u", "p:w")
    assert docker_credentials("other.example:8443") == Credentials("o", "pw")
    assert docker_credentials("tok.example") == Credentials(identity_token="refresh")
    assert docker_credentials("nothing.example") is None
    (cfg / "config.json").write_text(json.dumps({"credsStore": "nonexistent-helper-x",
                                                 "credHelpers": {"gcr.io": "gcloud-x"}}))
    with pytest.raises(Exception, match="docker-credential-nonexistent-helper-x is not installed"):
        docker_credentials("quay.io")
    with pytest.raises(Exception, match="docker-credential-gcloud-x is not installed"):
        docker_credentials("gcr.io")


def test_challenge_parsing():
    ch = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                         'scope="repository:library/busybox:pull,push"')
    assert ch.scheme == "bearer" and ch.realm == "https://auth.docker.io/token"
    assert ch.params["scope"] == "repository:library/busybox:pull,push"
    assert parse_challenge('Basic realm="x y"').params == {"realm": "x y"}


# ------------------------------------------------------------------ pulls from docker-registry

def test_pull_by_tag(pushed, images, store):
    ref = pushed.ref("busybox")
    res = do_pull(ref, store)
    manifest = pushed.registry.manifest("busybox", "latest")
    assert res.repo_digest == pushed.digests["busybox:latest"] == images.layout.digest("busybox")
    assert res.image.digest == res.repo_digest
    assert res.image.media_type == OCI_MANIFEST
    assert res.image.config_digest == manifest["config"]["digest"]
    assert [(l.digest, l.media_type, l.size) for l in res.image.layers] == [
        (l["digest"], l["mediaType"], l["size"]) for l in manifest["layers"]]
    assert res.image.extra_blobs == [] and res.image.platform == "linux/amd64"
    assert res.config["config"]["Cmd"] == ["sh"]
    assert res.config["architecture"] == "amd64"
    assert res.reference.key == f"{pushed.registry.host}/busybox:latest"
    for d in res.image.blobs:
        assert store.has(d)
        assert store.read(d) == images.layout.blob(d)     # what umoci made, byte for byte
    assert layer_file(store, res.image.layers[0].digest, "etc/hyperrun-test") == b"busybox\n"
    assert not list((store.root / "ingest").iterdir())


def test_pull_by_digest(pushed, store):
    digest = pushed.digests["busybox:latest"]
    res = do_pull(f"{pushed.registry.host}/busybox@{digest}", store)
    assert res.repo_digest == res.image.digest == digest
    assert res.reference.key == f"{pushed.registry.host}/busybox@{digest}"
    # tag and digest: the digest is what is fetched, the tag names it.
    res2 = do_pull(f"{pushed.registry.host}/busybox:whatever@{digest}", store)
    assert res2.image.digest == digest
    assert res2.reference.key == f"{pushed.registry.host}/busybox:whatever"
    # A digest the repository does not have.
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError) as e:
        do_pull(f"{pushed.registry.host}/busybox@{missing}", store)
    assert f"busybox@{missing}" in one_line(e.value) and "not found" in str(e.value)


def test_pull_docker_schema2(pushed, store):
    res = do_pull(pushed.ref("busybox:v2s2"), store)
    assert res.image.media_type == dist.DOCKER_MANIFEST
    assert res.image.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert res.repo_digest == pushed.digests["busybox:v2s2"]
    assert res.config["config"]["Cmd"] == ["sh"]


def test_pull_multi_layer(pushed, images, store):
    res = do_pull(pushed.ref("layered"), store)
    expected = images.layout.manifest("layered")["layers"]
    assert [l.digest for l in res.image.layers] == [l["digest"] for l in expected]
    assert len(res.image.layers) == 6
    # The whiteouts and the opaque marker are in the layers, as pushed.
    assert layer_file(store, res.image.layers[2].digest, "data/.wh.old.txt") == b""
    assert layer_file(store, res.image.layers[3].digest, "opt/app/.wh..wh..opq") == b""
    assert layer_file(store, res.image.layers[4].digest, "data/.wh.sub") == b""


def test_pull_config_fields(pushed, store):
    res = do_pull(pushed.ref("busybox-config"), store)
    c = res.config["config"]
    assert c["Entrypoint"] == ["/bin/sh", "-c"]
    assert c["WorkingDir"] == "/home/user" and c["User"] == "user:users"
    assert "GREETING=hello" in c["Env"] and c["StopSignal"] == "SIGINT"


@pytest.mark.parametrize("tag,index_type", [("latest", OCI_INDEX), ("v2s2", dist.DOCKER_LIST)])
@pytest.mark.parametrize("platform,arch,marker", [
    ("linux/amd64", "amd64", b"amd64\n"),
    ("linux/arm64", "arm64", b"arm64\n"),
    ("linux/arm64/v8", "arm64", b"arm64\n"),
    ("linux/aarch64", "arm64", b"arm64\n"),
])
def test_pull_platform_from_index(pushed, store, tag, index_type, platform, arch, marker):
    res = do_pull(pushed.ref(f"multi:{tag}"), store, platform=platform)
    index_digest = pushed.digests[f"multi:{tag}"]
    assert res.repo_digest == index_digest
    assert res.image.extra_blobs == [index_digest]
    assert res.image.digest != index_digest
    assert res.image.platform == f"linux/{arch}"
    assert res.config["architecture"] == arch
    assert json.loads(store.read(index_digest))["mediaType"] == index_type
    assert layer_file(store, res.image.layers[0].digest, "etc/hyperrun-test") == marker


def test_platform_not_in_index(pushed, store):
    before = blob_files(store)
    with pytest.raises(PlatformNotFound) as e:
        do_pull(pushed.ref("multi"), store, platform="linux/s390x")
    msg = one_line(e.value)
    assert "linux/s390x" in msg and "linux/amd64" in msg and "linux/arm64" in msg
    assert "multi:latest" in msg
    assert blob_files(store) == before
    with pytest.raises(PullError, match="expected os/arch"):
        do_pull(pushed.ref("multi"), store, platform="amd64")


def test_single_manifest_of_another_platform(pushed, store):
    with pytest.raises(PlatformNotFound, match="is for linux/amd64, not linux/arm64"):
        do_pull(pushed.ref("busybox"), store, platform="linux/arm64")


def test_not_found(pushed, store):
    with pytest.raises(NotFoundError) as e:
        do_pull(pushed.ref("busybox:nonexistent-tag"), store)
    assert f"{pushed.registry.host}/busybox:nonexistent-tag: not found" in one_line(e.value)
    with pytest.raises(NotFoundError):
        do_pull(pushed.ref("no/such/repo"), store)


def test_unreachable(store):
    port = free_port()
    t = time.monotonic()
    with pytest.raises(RegistryUnreachable) as e:
        do_pull(f"127.0.0.1:{port}/x", store, retries=1)
    assert f"cannot reach 127.0.0.1:{port}" in one_line(e.value)
    assert time.monotonic() - t < 10


def test_invalid_reference_is_a_pull_error(store):
    with pytest.raises(PullError, match="must be lowercase"):
        do_pull("Busybox", store)


# ------------------------------------------------------------------ TLS and basic auth

def tls_hosts(reg) -> Hosts:
    return Hosts.from_dict({"registry": [{"prefix": reg.host, "ca": str(reg.tls.ca)}]})


@pytest.fixture(scope="module")
def tls_pushed(tls_registry, images):
    return tls_registry.push(images.layout.path, images.busybox, "secure/busybox:latest")


def test_tls_basic_auth_from_docker_config(tls_registry, tls_pushed, store, tmp_path,
                                           monkeypatch):
    reg = tls_registry
    cfg = docker_config(tmp_path / "docker", {reg.host: basic_auth_entry(reg.user, reg.password)})
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    res = do_pull(reg.ref("secure/busybox"), store, hosts=tls_hosts(reg))
    assert res.repo_digest == tls_pushed
    assert all(store.has(d) for d in res.image.blobs)
    # username/password entries (and an https:// key) work too.
    docker_config(cfg, {f"https://{reg.host}": {"username": reg.user, "password": reg.password}})
    store2 = ContentStore(tmp_path / "content2")
    assert do_pull(reg.ref("secure/busybox"), store2, hosts=tls_hosts(reg)).repo_digest == tls_pushed


def test_tls_basic_auth_explicit(tls_registry, tls_pushed, store):
    reg = tls_registry
    res = do_pull(reg.ref("secure/busybox"), store, hosts=tls_hosts(reg),
                  auth=Credentials(reg.user, reg.password))
    assert res.repo_digest == tls_pushed


def test_tls_auth_refused(tls_registry, tls_pushed, store, tmp_path, monkeypatch):
    reg = tls_registry
    with pytest.raises(UnauthorizedError) as e:
        do_pull(reg.ref("secure/busybox"), store, hosts=tls_hosts(reg))
    msg = one_line(e.value)
    assert "unauthorized" in msg and "no credentials" in msg and "secure/busybox" in msg
    cfg = docker_config(tmp_path / "docker", {reg.host: basic_auth_entry(reg.user, "wrong")})
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    with pytest.raises(UnauthorizedError, match="refused the credentials"):
        do_pull(reg.ref("secure/busybox"), store, hosts=tls_hosts(reg))
    (cfg / "config.json").write_text(json.dumps({"credsStore": "hyperrun-test-missing"}))
    with pytest.raises(PullError, match="docker-credential-hyperrun-test-missing is not installed"):
        do_pull(reg.ref("secure/busybox"), store, hosts=tls_hosts(reg))
    assert blob_files(store) == set()


def test_tls_untrusted_ca(tls_registry, tls_pushed, store):
    with pytest.raises(TLSVerifyError) as e:
        do_pull(tls_registry.ref("secure/busybox"), store,
                auth=Credentials(tls_registry.user, tls_registry.password))
    assert "not trusted" in one_line(e.value)
    # insecure = true: TLS not verified.
    hosts = Hosts.from_dict({"registry": [{"prefix": tls_registry.host, "insecure": True}]})
    res = do_pull(tls_registry.ref("secure/busybox"), store, hosts=hosts,
                  auth=Credentials(tls_registry.user, tls_registry.password))
    assert res.repo_digest == tls_pushed


# ------------------------------------------------------------------ mirrors

def test_mirror_for_docker_hub(pushed, store, tmp_path, monkeypatch):
    reg = pushed.registry
    dead = free_port()
    hosts = Hosts.from_dict({"registry": [{
        "prefix": "docker.io",
        "mirrors": [f"http://127.0.0.1:{dead}", f"http://{reg.host}"]}]})
    res = do_pull("busybox", store, hosts=hosts, retries=0)
    assert str(res.reference) == "docker.io/library/busybox:latest"
    assert res.reference.key == "docker.io/library/busybox:latest"
    assert res.source == reg.host
    assert res.repo_digest == pushed.digests["library/busybox:latest"]
    # The same through the registries file that HYPERRUN_REGISTRIES names.
    (tmp_path / "registries.toml").write_text(
        f'[[registry]]\nprefix = "docker.io"\nmirrors = ["{reg.host}"]\n')
    monkeypatch.setenv("HYPERRUN_REGISTRIES", str(tmp_path / "registries.toml"))
    res = asyncio.run(pull("docker.io/library/busybox", ContentStore(tmp_path / "c2"),
                           progress=False))
    assert res.source == reg.host


def test_mirror_without_image_falls_through(pushed, store):
    # The mirror lacks the repository; the registry itself (here, another
    # name for the same local registry) is asked next.
    fake = FakeRegistry()
    try:
        hosts = Hosts.from_dict({"registry": [{"prefix": pushed.registry.host,
                                               "mirrors": [f"http://{fake.host}"]}]})
        res = do_pull(pushed.ref("busybox"), store, hosts=hosts)
        assert res.source == pushed.registry.host
        assert any("/v2/busybox/manifests/latest" in r[1] for r in fake.requests)
    finally:
        fake.close()


# ------------------------------------------------------------------ skipping what is present

def test_present_blobs_not_downloaded(pushed, store):
    with TCPProxy(pushed.registry.port) as proxy:
        first = do_pull(f"{proxy.host}/busybox", store)
        assert len(proxy.blob_requests()) == 2      # config and layer
        proxy.reset()
        again = do_pull(f"{proxy.host}/busybox", store)
        assert again.image == first.image
        assert proxy.blob_requests() == []
        assert [r[1] for r in proxy.requests if r[0] == "GET"] == ["/v2/busybox/manifests/latest"]
        assert again.skipped == [first.image.layers[0].digest] and again.downloaded == 0
        # layered shares busybox's layer: only its own five layers come.
        proxy.reset()
        layered = do_pull(f"{proxy.host}/layered", store)
        fetched = {r[1].rsplit("/", 1)[1] for r in proxy.blob_requests()}
        assert first.image.layers[0].digest not in fetched
        assert fetched == {l.digest for l in layered.image.layers[1:]} | {
            layered.image.config_digest}


def test_concurrent_pulls_share_downloads(pushed, store):
    """Two pulls of images sharing layers, at once, into one store: each
    blob is downloaded once (a lock per blob), both pulls complete."""
    async def both(host):
        return await asyncio.gather(
            pull(f"{host}/layered", store, hosts=NO_HOSTS, progress=False),
            pull(f"{host}/busybox", store, hosts=NO_HOSTS, progress=False))

    with TCPProxy(pushed.registry.port) as proxy:
        layered, busybox = asyncio.run(both(proxy.host))
        shared = busybox.image.layers[0].digest
        assert layered.image.layers[0].digest == shared
        gets = [r for r in proxy.blob_requests() if r[0] == "GET" and shared in r[1]]
        assert len(gets) == 1
        assert all(store.has(d) for d in layered.image.blobs + busybox.image.blobs)
        assert not list((store.root / "ingest").iterdir())


# ------------------------------------------------------------------ refused, store untouched

@pytest.fixture
def own_image(images, registry, tmp_path):
    """A fresh image in the registry whose blobs no other test shares (its
    stored blob files may be damaged)."""
    counter = own_image.__dict__.setdefault("n", [0])
    counter[0] += 1
    tag = f"own-{counter[0]}-{time.monotonic_ns()}"
    layout = Layout(tmp_path / "oci")
    build_random(layout, tag, tmp_path / "work", layer_sizes=[300_000, 20_000],
                 seed=time.monotonic_ns())
    registry.push(layout.path, tag, f"own:{tag}")
    manifest = layout.manifest(tag)
    return registry.ref(f"own:{tag}"), manifest


def test_blob_digest_mismatch(registry, own_image, store):
    ref, manifest = own_image
    layer = manifest["layers"][0]["digest"]
    data = registry.blob_data(layer)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                  # same size, different content
    data.write_bytes(bytes(raw))
    before = blob_files(store)
    with pytest.raises(DigestMismatch) as e:
        do_pull(ref, store, retries=1)
    msg = one_line(e.value)
    assert layer in msg and "does not match its digest" in msg and "own:" in msg
    assert blob_files(store) == before
    assert not any(p.name.startswith(layer.replace(":", "-")) and p.stat().st_size
                   for p in (store.root / "ingest").iterdir())


def test_blob_truncated(registry, own_image, store):
    ref, manifest = own_image
    layer = manifest["layers"][0]
    data = registry.blob_data(layer["digest"])
    with open(data, "r+b") as f:
        f.truncate(layer["size"] // 2)
    before = blob_files(store)
    with pytest.raises(TruncatedBlob) as e:
        do_pull(ref, store, retries=1)
    msg = one_line(e.value)
    assert f"got {layer['size'] // 2} of {layer['size']} bytes" in msg
    assert blob_files(store) == before


def _fake_image(fake: FakeRegistry, repo: str, *, config_type="application/vnd.oci.image.config.v1+json"):
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    layer = gzip.compress(layer_tar.getvalue())
    diff_id = "sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "config": {"Cmd": ["/hello"]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": fake.add_blob(repo, config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": fake.add_blob(repo, layer), "size": len(layer)}]}).encode()
    return manifest


def test_manifest_wrong_media_type(store):
    before = blob_files(store)
    with FakeRegistry() as fake:
        manifest = _fake_image(fake, "img")
        # A Docker schema 1 Content-Type.
        fake.add_manifest("img", "schema1", b'{"schemaVersion": 1, "name": "img"}',
                          "application/vnd.docker.distribution.manifest.v1+prettyjws")
        # An unknown Content-Type, body otherwise an image.
        fake.add_manifest("img", "weird", manifest, "application/vnd.example.thing.v1+json")
        # Content-Type right, mediaType field wrong.
        doc = json.loads(manifest)
        doc["mediaType"] = "application/vnd.oci.artifact.manifest.v1+json"
        fake.add_manifest("img", "field", json.dumps(doc).encode(), OCI_MANIFEST)
        # An OCI artifact (a helm chart), not a container image.
        artifact = _fake_image(fake, "img", config_type="application/vnd.cncf.helm.config.v1+json")
        fake.add_manifest("img", "artifact", artifact, OCI_MANIFEST)
        # And the good one, to show the fake serves a pullable image.
        fake.add_manifest("img", "good", manifest, OCI_MANIFEST)
        for tag, message in [("schema1", "schema 1 manifests are not supported"),
                             ("weird", "unsupported manifest media type "
                                       "'application/vnd.example.thing.v1+json'"),
                             ("field", "'application/vnd.oci.artifact.manifest.v1+json'"),
                             ("artifact", "not a container image")]:
            with pytest.raises(UnsupportedMediaType) as e:
                do_pull(f"{fake.host}/img:{tag}", store)
            assert message in one_line(e.value) and f"img:{tag}" in str(e.value)
            assert blob_files(store) == before
        res = do_pull(f"{fake.host}/img:good", store)
        assert layer_file(store, res.image.layers[0].digest, "hello.txt") == b"hello\n"


def test_manifest_digest_checked(store):
    with FakeRegistry() as fake:
        manifest = _fake_image(fake, "img")
        wrong = "sha256:" + "1" * 64
        fake.add_manifest("img", "lying", manifest, OCI_MANIFEST, digest_header=wrong)
        with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
            do_pull(f"{fake.host}/img:lying", store)
        # By digest: the body must hash to it.
        fake.routes[f"/v2/img/manifests/{wrong}"] = (200, {"Content-Type": OCI_MANIFEST}, manifest)
        with pytest.raises(DigestMismatch, match=f"expected {wrong}"):
            do_pull(f"{fake.host}/img@{wrong}", store)
        # No Docker-Content-Digest header: computed and accepted.
        good = fake.add_manifest("img", "noheader", manifest, OCI_MANIFEST, digest_header=None)
        assert do_pull(f"{fake.host}/img:noheader", store).repo_digest == good
        assert blob_files(store) == {d.split(":")[1] for d in (
            good, *(x["digest"] for x in json.loads(manifest)["layers"]),
            json.loads(manifest)["config"]["digest"])}


def test_bearer_token_auth(store, tmp_path, monkeypatch):
    """The WWW-Authenticate Bearer flow: token fetched with the challenge's
    service and scope (with basic credentials when there are some), cached
    for the scope, and sent on every request."""
    with FakeRegistry() as fake:
        manifest = _fake_image(fake, "team/app")
        fake.add_manifest("team/app", "1", manifest, OCI_MANIFEST)
        token_requests = []

        def token(handler):
            token_requests.append((handler.path, handler.headers.get("Authorization")))
            if handler.headers.get("Authorization") != "Basic " + base64.b64encode(
                    b"alice:pw").decode():
                return 401, {}, b""
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"token": "tok-123", "expires_in": 300}).encode()

        fake.routes["/token"] = token
        protected = {p: r for p, r in fake.routes.items() if p.startswith("/v2/")}

        def guard(route):
            def serve(handler):
                if handler.headers.get("Authorization") != "Bearer tok-123":
                    return 401, {"WWW-Authenticate":
                                 f'Bearer realm="http://{fake.host}/token",service="fake",'
                                 f'scope="repository:team/app:pull"'}, b""
                return route
            return serve

        for path, route in protected.items():
            fake.routes[path] = guard(route)
        cfg = docker_config(tmp_path / "docker", {fake.host: basic_auth_entry("alice", "pw")})
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        res = do_pull(f"{fake.host}/team/app:1", store)
        assert len(res.image.layers) == 1
        assert len(token_requests) == 1
        path, _ = token_requests[0]
        assert "service=fake" in path and "scope=repository%3Ateam%2Fapp%3Apull" in path
        # A registry token given with the pull is sent as is: no token request.
        token_requests.clear()
        res = do_pull(f"{fake.host}/team/app:1", ContentStore(tmp_path / "c3"),
                      auth=Credentials(registry_token="tok-123"))
        assert token_requests == [] and res.image.layers
        # Wrong password: the token server refuses.
        docker_config(cfg, {fake.host: basic_auth_entry("alice", "nope")})
        with pytest.raises(UnauthorizedError, match="token server .* refused the credentials"):
            do_pull(f"{fake.host}/team/app:1", ContentStore(tmp_path / "c2"))


# ------------------------------------------------------------------ interrupted and resumed

def big_layer(pushed) -> dict:
    return max(pushed.registry.manifest("big", "latest")["layers"], key=lambda l: l["size"])


def test_interrupted_pull_resumes_on_retry(pushed, store):
    layer = big_layer(pushed)
    with TCPProxy(pushed.registry.port) as proxy:
        proxy.cut_after, proxy.cuts = layer["size"] // 3, None   # every blob response is cut
        with pytest.raises(RegistryUnreachable) as e:
            do_pull(f"{proxy.host}/big", store, retries=1)
        assert "connection to" in one_line(e.value) and "lost after" in str(e.value)
        assert not store.has(layer["digest"])
        partial = store.root / "ingest" / layer["digest"].replace(":", "-")
        have = partial.stat().st_size
        assert 0 < have < layer["size"]
        first_bytes = proxy.bytes_down

        proxy.cut_after = None
        proxy.reset()
        res = do_pull(f"{proxy.host}/big", store)
        assert store.has(layer["digest"]) and res.image.layers
        ranged = [r for r in proxy.blob_requests() if layer["digest"] in r[1]]
        assert ranged and ranged[0][2] == f"bytes={have}-"
        # The second attempt fetched only what was missing.
        assert proxy.bytes_down < layer["size"] - have + 200_000
        assert proxy.bytes_down < first_bytes
        assert not partial.exists()


def test_connection_cut_mid_layer_is_retried_within_a_pull(pushed, store):
    layer = big_layer(pushed)
    with TCPProxy(pushed.registry.port) as proxy:
        proxy.cut_after, proxy.cuts = layer["size"] // 2, 1
        res = do_pull(f"{proxy.host}/big", store)
        assert store.has(layer["digest"])
        gets = [r for r in proxy.blob_requests() if layer["digest"] in r[1]]
        assert len(gets) == 2 and gets[0][2] is None and gets[1][2].startswith("bytes=")
        assert res.downloaded < layer["size"] * 1.1 + 100_000


# ------------------------------------------------------------------ progress

def test_progress_display(pushed, store):
    from rich.console import Console

    from hyperrun.image.progress import RichProgress

    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, force_terminal=True, width=100))
    do_pull(pushed.ref("layered"), store, progress=progress)
    assert "MB" in buf.getvalue() or "kB" in buf.getvalue()


def test_quiet_without_terminal(pushed, store, capfd):
    asyncio.run(pull(pushed.ref("busybox"), store, hosts=NO_HOSTS))
    assert capfd.readouterr().err == ""
