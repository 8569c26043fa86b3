import signal

import pytest

from hyperrun.image.imageconfig import ImageConfigError, Overrides, apply, parse_signal

CFG = {"config": {"Entrypoint": ["/entry", "-x"], "Cmd": ["serve"], "Env": ["PATH=/bin", "A=1"],
                  "WorkingDir": "/srv", "User": "app", "StopSignal": "SIGQUIT"}}


def test_image_defaults():
    p = apply(CFG, Overrides())
    assert p.args == ["/entry", "-x", "serve"]
    assert p.env == ["PATH=/bin", "A=1"] and p.cwd == "/srv" and p.user == "app"
    assert p.stop_signal == signal.SIGQUIT


def test_overrides_like_docker():
    p = apply(CFG, Overrides(args=["other"], env=["A=2", "B=3"], workdir="/tmp", user="0:0"))
    assert p.args == ["/entry", "-x", "other"]
    assert p.env == ["PATH=/bin", "A=2", "B=3"] and p.cwd == "/tmp" and p.user == "0:0"
    # --entrypoint resets the image's Cmd.
    assert apply(CFG, Overrides(entrypoint=["sh"])).args == ["sh"]
    assert apply(CFG, Overrides(entrypoint=["sh"], args=["-c", "x"])).args == ["sh", "-c", "x"]
    # --entrypoint "" drops the image's entrypoint and runs the command.
    assert apply(CFG, Overrides(entrypoint=[""], args=["ls"])).args == ["ls"]


def test_missing_command_and_signals():
    with pytest.raises(ImageConfigError, match="no command"):
        apply({"config": {}}, Overrides())
    assert apply({}, Overrides(args=["true"])).cwd == "/"
    assert parse_signal("TERM") == parse_signal("15") == parse_signal(None) == signal.SIGTERM
    with pytest.raises(ImageConfigError):
        parse_signal("SIGNOPE")
