import pytest

from hyperrun import config
from hyperrun.specs import PodSpec


def test_defaults_and_file(tmp_path):
    with pytest.raises(config.ConfigError):
        config.load(tmp_path / "absent.toml")
    path = tmp_path / "config.toml"
    path.write_text("[sandbox]\nvcpus = 2\nmemory_mib = 512\n")
    d = config.load(path)
    assert (d.vcpus, d.memory_mib, d.machine) == (2, 512, "microvm")
    refused(path, "[sandbox]\nvcpu = 2\n", "unknown key sandbox.vcpu")
    refused(path, "[sandbox]\nmemory_mib = '1G'\n", "must be int")
    refused(path, "[sandbox\n", None)


def refused(path, text: str, match: str | None) -> None:
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=match):
        config.load(path)


def test_vm_size_from_pod_resources():
    d = config.SandboxDefaults()
    assert config.vm_size(d, PodSpec("p")) == (1, 256)
    limited = PodSpec("p", cpus=2.5, memory_limit_bytes=1 << 30, overhead_memory_bytes=64 << 20)
    assert config.vm_size(d, limited) == (3, 1024 + 64 + d.overhead_mib)
    huge = PodSpec("p", cpus=10**4, memory_limit_bytes=1 << 50)
    assert config.vm_size(d, huge) == (d.max_vcpus, d.max_memory_mib)


def test_clone_cache_size(tmp_path):
    """`[sandbox] clone_cache_mib` sizes a template clone's TCG cache (not a
    pool spare's, which keeps a boot's), and nothing below 4 MiB."""
    import os

    from hyperrun.sandbox.config import SandboxConfig
    from hyperrun.vm.template import Template, clone_config

    path = tmp_path / "config.toml"
    assert config.SandboxDefaults().clone_cache_mib == 32
    path.write_text("[sandbox]\nclone_cache_mib = 16\n")
    assert config.load(path).clone_cache_mib == 16
    path.write_text("[sandbox]\nclone_cache_mib = 2\n")
    with pytest.raises(config.ConfigError, match="clone_cache_mib must be 4 or more"):
        config.load(path)
    (tmp_path / "tpl").mkdir()
    template = Template(tmp_path / "tpl")
    template.state.write_bytes(b"")
    booted = SandboxConfig().vm_config()
    for cache_mib, expected in ((16, 16), (None, booted.tb_size_mib), (4096, booted.tb_size_mib)):
        clone = clone_config(booted, template, cache_mib)
        os.close(clone.incoming_fd)
        assert clone.tb_size_mib == expected and clone.incoming and not clone.memory_shared


def test_auto_templates_and_pool(tmp_path):
    """By default ("auto") a daemon makes templates and keeps a pool sized
    from the host's available memory; a run without a daemon does neither;
    explicit values stay as they are."""
    d = config.SandboxDefaults()
    assert (d.template, d.pool_size) == ("auto", "auto")
    daemon = config.resolve(d, daemon=True, available_mib=16 << 10)
    assert (daemon.template, daemon.pool_size) == (True, config.POOL_AUTO_MAX)
    assert config.resolve(d, daemon=True, available_mib=3000).pool_size == 1
    assert config.resolve(d, daemon=True, available_mib=1000).pool_size == 0
    embedded = config.resolve(d, daemon=False, available_mib=16 << 10)
    assert (embedded.template, embedded.pool_size) == (False, 0)
    assert d.template == "auto"  # resolve leaves its argument alone
    path = tmp_path / "config.toml"
    path.write_text('[sandbox]\ntemplate = false\npool_size = 3\n')
    explicit = config.resolve(config.load(path), daemon=True, available_mib=0)
    assert (explicit.template, explicit.pool_size) == (False, 3)
    path.write_text('[sandbox]\ntemplate = "auto"\npool_size = "auto"\n')
    assert (config.load(path).template, config.load(path).pool_size) == ("auto", "auto")
    refused(path, '[sandbox]\npool_size = "many"\n', 'pool_size must be int or "auto"')
    refused(path, '[sandbox]\ntemplate = "yes"\n', 'template must be bool or "auto"')


def test_template_vms_keep_the_lapic_timer():
    """Under TCG a booted VM skips the LAPIC timer's calibration
    (nolapic_timer); a template's VM keeps it, so clones idle tickless."""
    from hyperrun.sandbox.config import SandboxConfig

    from dataclasses import replace

    booted = replace(SandboxConfig().vm_config(), accel="tcg")
    assert "nolapic_timer" in booted.cmdline().split()
    assert "nolapic_timer" not in replace(booted, lapic_timer=True).cmdline().split()
