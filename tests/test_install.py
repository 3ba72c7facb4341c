"""make install hands pip's index settings to uv, so a machine's mirrors and constraints keep working."""

from scripts.install import pip_settings, uv_arguments

LISTING = """\
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/elsewhere'
global.cert='/etc/ssl/certs/ca-certificates.crt'
"""


def test_pip_settings_take_files_and_let_the_environment_win():
    settings = pip_settings(LISTING)
    assert settings["find-links"] == "/opt/wheels"  # PIP_FIND_LINKS beats the config file, as in pip
    assert settings["constraint"] == "/etc/xdg/pip/constraints.txt"
    assert settings["cert"] == "/etc/ssl/certs/ca-certificates.crt"


def test_uv_gets_every_index_link_and_constraint_and_resolves_like_pip():
    arguments = uv_arguments(pip_settings(LISTING))
    assert arguments[:2] == ["--index-strategy", "unsafe-best-match"]
    pairs = list(zip(arguments[2::2], arguments[3::2]))
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs and ("--find-links", "/elsewhere") not in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert "--index-url" not in arguments  # none configured: uv's default (PyPI), like pip's


def test_no_pip_settings_means_plain_uv():
    assert uv_arguments(pip_settings("")) == ["--index-strategy", "unsafe-best-match"]
