"""Manifests, indexes, image configs and references from a hostile registry
(hyperrun/image/distribution.py, reference.py, imageconfig.py).

Random JSON, random bytes and valid documents with fields replaced or
removed go through the same code a pull runs: the media type decision, the
platform selection in an index, the manifest's descriptors, the whole
index -> manifest -> config walk, and the image config applied to a
container. Only the typed errors (PullError and its subclasses,
InvalidReference, ImageConfigError) may come out. Manifests larger than
MANIFEST_MAX and configs larger than CONFIG_MAX are refused without being
read whole.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re

import pytest
from hypothesis import assume, example, given, strategies as st

from hyperrun.image import distribution as d
from hyperrun.image import imageconfig, reference
from hyperrun.image.distribution import (CONFIG_MAX, CONFIG_TYPES, INDEX_TYPES, LAYER_TYPES,
                                         MANIFEST_MAX, MANIFEST_TYPES, ManifestError, Platform,
                                         PullError, PullResult)
from hyperrun.image.progress import NullProgress
from hyperrun.image.reference import InvalidReference, Reference

from . import FUZZ, budget, counted, still_failing


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def puller(ref: str = "registry.test/app:1") -> d._Puller:
    return d._Puller(reference.parse(ref), [], None, 0, 1, NullProgress())


# ---------------------------------------------------------------------------
# documents

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                   st.floats(allow_nan=False), st.text(max_size=20),
                   st.sampled_from(MANIFEST_TYPES + CONFIG_TYPES + LAYER_TYPES
                                   + ("linux", "amd64", "arm64", "v8", "unknown", "sha256:",
                                      "SIGKILL", "KILL", "0", "9", "99999", "-1", "²")))
json_value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["mediaType", "schemaVersion", "config", "layers",
                                     "manifests", "digest", "size", "platform", "os",
                                     "architecture", "variant", "rootfs", "diff_ids",
                                     "Entrypoint", "Cmd", "Env", "User", "WorkingDir",
                                     "StopSignal"]) | st.text(max_size=8),
                    inner, max_size=5)), max_leaves=20)
hex64 = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
platform_dict = st.fixed_dictionaries(
    {"os": st.sampled_from(["linux", "windows", "unknown"]),
     "architecture": st.sampled_from(["amd64", "arm64", "arm", "x86_64", "aarch64", "386"])},
    optional={"variant": st.sampled_from(["", "v6", "v7", "v8"])})


def config_doc(os_="linux", arch="amd64", layers=1, entrypoint=None, cmd=("sh",)):
    cfg = {"Cmd": list(cmd)}
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    return {"architecture": arch, "os": os_, "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{i:064x}" for i in range(layers)]}}


def manifest_doc(config: bytes, layers: list[str], media=d.OCI_MANIFEST) -> dict:
    return {"schemaVersion": 2, "mediaType": media,
            "config": {"mediaType": CONFIG_TYPES[0], "digest": digest_of(config),
                       "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPES[1], "digest": l, "size": 100} for l in layers]}


def index_doc(entries: list[tuple[bytes, dict]], media=d.OCI_INDEX) -> dict:
    return {"schemaVersion": 2, "mediaType": media,
            "manifests": [{"mediaType": d.OCI_MANIFEST, "digest": digest_of(m), "size": len(m),
                           "platform": p} for m, p in entries]}


def _slots(doc, out):
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((doc, k))
            _slots(v, out)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((doc, i))
            _slots(v, out)
    return out


edit = st.tuples(st.integers(0, 1 << 16), json_value, st.sampled_from(["set", "set", "delete"]))


def mutate_doc(doc, edits):
    """Replace or remove fields anywhere in a document."""
    doc = copy.deepcopy(doc)
    for choice, value, op in edits:
        slots = _slots(doc, [])
        if not slots:
            break
        container, key = slots[choice % len(slots)]
        if op == "delete":
            del container[key]
        else:
            container[key] = value
    return doc


def encode(doc) -> bytes:
    return json.dumps(doc).encode()


body_bytes = st.one_of(
    st.binary(max_size=200),
    json_value.map(encode),
    st.builds(lambda doc, edits: encode(mutate_doc(doc, edits)),
              st.builds(manifest_doc, st.just(encode(config_doc())),
                        st.lists(hex64, max_size=3)) |
              st.builds(index_doc, st.lists(st.tuples(st.just(b"{}"), platform_dict),
                                            max_size=3)),
              st.lists(edit, max_size=3)))
content_type = st.one_of(st.sampled_from(MANIFEST_TYPES + d.SCHEMA1_TYPES + d.GENERIC_TYPES
                                         + ("application/json; charset=utf-8", "TEXT/HTML")),
                         st.text(max_size=30))


# ---------------------------------------------------------------------------
# the pieces


@FUZZ
@given(ct=content_type, body=body_bytes)
@counted
def test_media_type_decision(ct, body):
    try:
        media_type, doc = puller()._media_type(ct, body)
    except ManifestError:
        return
    assert media_type in MANIFEST_TYPES
    assert isinstance(doc, dict)


@FUZZ
@given(index=st.one_of(json_value, st.builds(
    mutate_doc, st.builds(index_doc, st.lists(st.tuples(st.just(b"{}"), platform_dict),
                                              max_size=4)),
    st.lists(edit, max_size=3))),
       want=st.sampled_from(["linux/amd64", "linux/arm64", "linux/arm", "linux/arm/v7"]))
# Found by this property in CI: a variant with a / ("linux/arm64/application/vnd...")
# was selected and written as a platform that does not read back.
@example(index=index_doc([(b"{}", {"os": "linux", "architecture": "arm64",
                                   "variant": d.OCI_MANIFEST})]), want="linux/arm64")
@counted
def test_index_platform_selection(index, want):
    assume(isinstance(index, dict))
    p = Platform.parse(want)
    try:
        entry = puller().select(index, p)
    except PullError:
        return
    assert isinstance(entry, dict) and entry in [
        {**e, "_platform": entry["_platform"]} for e in index["manifests"] if isinstance(e, dict)]
    assert p.matches(Platform.parse(entry["_platform"]))


@FUZZ
@given(doc=st.one_of(json_value, st.builds(
    mutate_doc, st.builds(manifest_doc, st.just(b"{}"), st.lists(hex64, max_size=3)),
    st.lists(edit, max_size=3))))
@counted
def test_manifest_descriptors(doc):
    assume(isinstance(doc, dict))
    try:
        config, layers = puller()._parse_manifest(doc)
    except ManifestError:
        return
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", config["digest"])
    assert config["mediaType"] in CONFIG_TYPES
    for layer in layers:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", layer.digest)
        assert isinstance(layer.size, int) and layer.size >= 0
        assert layer.media_type in LAYER_TYPES


# -- the whole walk: index -> manifest -> config, from a store that holds
#    whatever the registry sent


class FakeStore:
    """Every digest is "present": reading one the documents do not hold
    gives empty bytes (as a registry serving garbage would)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def has(self, digest: str) -> bool:
        return True

    def read(self, digest: str) -> bytes:
        return self.blobs.get(digest, b"")

    def size(self, digest: str) -> int:
        return len(self.read(digest))

    def put(self, data: bytes, digest: str) -> None:
        pass


def image_docs(config, manifests_edits, index_edits, platforms, nested):
    cfg = encode(config)
    layers = [f"sha256:{i:064x}" for i in range(2)]
    manifest = encode(mutate_doc(manifest_doc(cfg, layers), manifests_edits))
    blobs = {digest_of(cfg): cfg, digest_of(manifest): manifest}
    index = encode(mutate_doc(index_doc([(manifest, p) for p in platforms]), index_edits))
    blobs[digest_of(index)] = index
    top = index
    if nested:
        outer = encode(index_doc([(index, platforms[0] if platforms else {})]))
        blobs[digest_of(outer)] = outer
        top = outer
    return blobs, top, manifest


@budget(1.0)
@given(config=st.one_of(st.just(config_doc()), st.builds(mutate_doc, st.just(config_doc()),
                                                          st.lists(edit, max_size=3)),
                        json_value),
       manifest_edits=st.lists(edit, max_size=2), index_edits=st.lists(edit, max_size=2),
       platforms=st.lists(platform_dict, max_size=3), nested=st.booleans(),
       start=st.sampled_from(["index", "manifest"]))
@counted
def test_pull_walk_over_hostile_documents(config, manifest_edits, index_edits, platforms,
                                          nested, start):
    blobs, top, manifest = image_docs(config, manifest_edits, index_edits, platforms, nested)
    if start == "manifest":
        top = manifest
    p = puller(f"registry.test/app@{digest_of(top)}")

    async def no_network(*args, **kwargs):
        raise d.NotFoundError("no network in this test")

    p.fetch_manifest = no_network
    p.fetch_small = no_network
    try:
        result = asyncio.run(p.run(FakeStore(blobs), Platform.parse("linux/amd64")))
    except PullError:
        return
    assert isinstance(result, PullResult)
    assert isinstance(result.config, dict)
    assert result.image.media_type in MANIFEST_TYPES and result.image.media_type not in INDEX_TYPES
    for layer in result.image.layers:
        assert layer.media_type in LAYER_TYPES


# -- size limits


class FakeResponse:
    def __init__(self, chunks, status: int = 200, headers: dict | None = None) -> None:
        self._chunks = chunks
        self.status_code = status
        self.headers = headers or {}
        self.consumed = 0

    async def aiter_raw(self):
        for chunk in self._chunks:
            self.consumed += len(chunk)
            yield chunk

    async def aread(self) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass


class FakeSession:
    name = "fake"

    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.requests = 0

    async def send(self, method, path, headers, scope):
        self.requests += 1
        return self.response


def _padded(body: bytes, size: int, chunk: int):
    """body followed by JSON whitespace up to size bytes, in chunks (lazily)."""
    yield body
    pad = b" " * chunk
    left = size - len(body)
    while left > 0:
        yield pad[:left]
        left -= chunk


@budget(0.2)
@given(extra=st.integers(1, 1 << 22), chunk=st.sampled_from([1 << 14, 1 << 16, 1 << 20]),
       ct=st.sampled_from(MANIFEST_TYPES))
@counted
def test_oversized_manifest_refused_while_reading(extra, chunk, ct):
    """A valid manifest padded past MANIFEST_MAX (whitespace keeps it valid
    JSON) is refused, and reading stops at the chunk that crossed the limit."""
    body = encode(manifest_doc(b"{}", []))
    response = FakeResponse(_padded(body, MANIFEST_MAX + extra, chunk), headers={
        "content-type": ct})
    p = puller()
    try:
        asyncio.run(p._get_manifest(FakeSession(response), "1", None, None))
    except ManifestError as exc:
        assert "larger than" in str(exc)
    else:
        raise AssertionError("an oversized manifest was accepted")
    assert response.consumed <= MANIFEST_MAX + chunk


@budget(0.5)
@given(size=st.integers(CONFIG_MAX + 1, 1 << 62))
@counted
def test_oversized_config_refused_before_fetching(size):
    p = puller()
    session = FakeSession(FakeResponse([b"{}"]))
    desc = {"digest": digest_of(b"{}"), "size": size, "mediaType": CONFIG_TYPES[0]}
    with pytest.raises(ManifestError, match="limit"):
        asyncio.run(p.fetch_small(desc, "config", CONFIG_MAX, session))
    assert session.requests == 0


@budget(0.5)
@given(size=st.integers(0, 1000), extra=st.integers(1, 1 << 20))
@counted
def test_config_larger_than_its_descriptor_refused(size, extra):
    """A registry sending more than the descriptor's size is cut off there."""
    body = b"x" * (size + extra)
    response = FakeResponse([body[i:i + 4096] for i in range(0, len(body), 4096)])
    desc = {"digest": digest_of(body[:size]), "size": size, "mediaType": CONFIG_TYPES[0]}
    with pytest.raises(PullError):
        asyncio.run(puller().fetch_small(desc, "config", CONFIG_MAX, FakeSession(response)))
    assert response.consumed <= size + 4096


# ---------------------------------------------------------------------------
# references (also what CRI's ImageSpec and PullImage carry)

ref_chars = st.lists(st.sampled_from(list("abcAB09._-/:@+ é\t\n") + ["sha256:", "a" * 64,
                                                                     "library/", "docker.io/"]),
                     max_size=20).map("".join)


@FUZZ
@given(text=st.one_of(st.text(max_size=80), ref_chars))
@counted
def test_reference_parse_any_text(text):
    try:
        ref = reference.parse(text)
    except InvalidReference:
        return
    assert len(ref.name) <= reference.NAME_MAX
    assert ref.tag is not None or ref.digest is not None
    # normalised forms parse back to the same reference
    assert reference.parse(str(ref)) == ref
    assert reference.parse(ref.familiar) == ref
    assert reference.parse(ref.key) == Reference(ref.registry, ref.repository, ref.tag,
                                                 ref.digest if ref.tag is None else None)


component = st.from_regex(r"\A[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
domain = st.one_of(st.just("localhost"), st.from_regex(r"\A[a-z0-9]+(?:\.[a-z0-9]+)+\Z"),
                   st.from_regex(r"\A[a-z0-9]+(?:\.[a-z0-9]+)*:[0-9]{1,5}\Z"))
tag = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


@FUZZ
@given(registry=st.one_of(st.none(), domain),
       path=st.lists(st.one_of(component, st.just("library")), min_size=1, max_size=4),
       tag=st.one_of(st.none(), tag), digest=st.one_of(st.none(), hex64))
@counted
def test_reference_grammar(registry, path, tag, digest):
    """References built from the grammar parse, normalised as Docker does."""
    text = "/".join(([registry] if registry else []) + path)
    first = path[0]
    if registry is None and len(path) > 1 and ("." in first or ":" in first or
                                               first == "localhost"):
        # the first component names a registry (and must be a host name)
        if not re.fullmatch(r"[a-z0-9]+(?:-+[a-z0-9]+)*(?:\.[a-z0-9]+(?:-+[a-z0-9]+)*)*", first):
            with pytest.raises(InvalidReference, match="bad registry name"):
                reference.parse(text)
            return
        registry, path = first, path[1:]
    want_registry = registry or "docker.io"
    want_repo = "/".join(path)
    if want_registry == "docker.io" and len(path) == 1:
        want_repo = "library/" + want_repo
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    try:
        ref = reference.parse(text)
    except InvalidReference:
        assert len(want_registry) + 1 + len(want_repo) > reference.NAME_MAX
        return
    assert (ref.registry, ref.repository) == (want_registry, want_repo)
    assert ref.digest == digest
    assert ref.tag == (tag if tag else (None if digest else "latest"))
    assert reference.parse(str(ref)) == ref
    assert reference.parse(ref.familiar) == ref


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.builds(
    "/".join, st.lists(st.sampled_from(["linux", "amd64", "ARM64", "arm", "v7", "", " ", "x86_64",
                                        "a/b"]), max_size=4))))
@counted
def test_platform_parse(text):
    try:
        p = Platform.parse(text)
    except d.BadReference:
        return
    assert p.os and p.architecture
    assert Platform.parse(str(p)) == p


# ---------------------------------------------------------------------------
# the image config, applied to a container (CRI CreateContainer)

overrides = st.builds(imageconfig.Overrides,
                      args=st.lists(st.text(max_size=5), max_size=2),
                      entrypoint=st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=2)),
                      env=st.lists(st.text(max_size=8), max_size=2),
                      workdir=st.sampled_from(["", "/w"]), user=st.sampled_from(["", "1:1"]))


CONFIG_PROBES = [{"config": {"Cmd": [None]}},
                 {"config": {"Cmd": ["a"], "StopSignal": "²"}},
                 {"config": {"Cmd": ["a"], "StopSignal": "99999"}}]


def _config_probe():
    for config in CONFIG_PROBES:
        try:
            p = imageconfig.apply(config, imageconfig.Overrides())
        except imageconfig.ImageConfigError:
            continue
        assert all(isinstance(a, str) for a in p.args) and 0 < p.stop_signal < 65


@pytest.mark.xfail(still_failing(_config_probe), strict=True,
                   raises=(AssertionError, AttributeError, TypeError, ValueError,
                           ExceptionGroup), reason=(
    "found here, not fixed here (hyperrun/image/imageconfig.py is outside this change): "
    "apply() passes a registry's non-string Cmd/Entrypoint/Env/WorkingDir/User items through "
    "(a TypeError later, in CreateContainer), reads config/Env of the wrong JSON type with "
    "AttributeError, and takes StopSignal '99999' or '0' as a signal and '²' with ValueError"))
@FUZZ
@example(config=CONFIG_PROBES[0], o=imageconfig.Overrides())
@example(config=CONFIG_PROBES[1], o=imageconfig.Overrides())
@example(config=CONFIG_PROBES[2], o=imageconfig.Overrides())
@given(config=st.one_of(json_value, st.builds(mutate_doc, st.just(config_doc()),
                                              st.lists(edit, max_size=3))),
       o=overrides)
@counted
def test_image_config_applied(config, o):
    """An image config is registry data: applying it gives a process of
    strings, or ImageConfigError."""
    assume(isinstance(config, dict))
    try:
        p = imageconfig.apply(config, o)
    except imageconfig.ImageConfigError:
        return
    assert p.args and all(isinstance(a, str) for a in p.args)
    assert all(isinstance(e, str) for e in p.env)
    assert isinstance(p.cwd, str) and isinstance(p.user, str)
    assert isinstance(p.stop_signal, int) and 0 < p.stop_signal < 65
