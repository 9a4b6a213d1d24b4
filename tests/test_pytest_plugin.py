"""memwise's pytest plugin (the ``pytest11`` entry point): fixtures a plugin author gets on install."""

from __future__ import annotations

import pytest

TEST_FILE = '''
import dataclasses

import memwise
from memwise import hookimpl, option
from memwise.manager import available, load


class EchoPlugin(memwise.Plugin):
    """Does nothing but exist; enough for discovery."""

    name = "echo"
    summary = "a plugin defined inside a test"

    @dataclasses.dataclass
    class Config:
        level: int = option(1, "unused")


def test_tiny_llama(tiny_llama):
    model = tiny_llama(layers=3)
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 2


def test_installed_plugin(installed_plugin):
    assert "echo" not in available()
    installed_plugin(EchoPlugin)
    assert available()["echo"].distribution == "memwise-echo"
    assert load("echo") is EchoPlugin


def test_installed_plugin_ends_with_its_test():
    assert "echo" not in available()


def test_slow_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
'''


@pytest.mark.slow
def test_fixtures_reach_a_plugin_authors_tests(pytester):
    pytester.makepyfile(test_author=TEST_FILE)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
