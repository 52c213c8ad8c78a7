"""A model states how it wants to run in generation_config.json: whether it thinks and how long it answers.

The embedded demo cannot think and writes code-like text, so its first run must not spend thousands of
tokens in a <think> block (a user's first `streamer chat` did). chat, generate and serve all honour the
model's ``enable_thinking`` and ``max_new_tokens``; flags override them; Qwen3.5 checkpoints, which set
neither, keep thinking on and the long default.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streamer.cli import chat as chat_command
from streamer.cli.main import main
from streamer.errors import ConfigError
from streamer.generation.sampling import model_max_tokens, model_thinks_by_default
from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, _settings
from streamer.synthetic import demo


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("STREAMER_HOME", str(home))
    yield demo.demo_packed()
    mp.undo()


def test_rules_read_generation_config():
    assert model_thinks_by_default({}) is True  # Qwen3.5 thinks unless told otherwise
    assert model_thinks_by_default({"enable_thinking": False}) is False
    assert model_max_tokens({}, 4096) == 4096
    assert model_max_tokens({"max_new_tokens": 300}, 4096) == 300
    for bad in ({"enable_thinking": "no"}, {"enable_thinking": 0}):
        with pytest.raises(ConfigError, match="enable_thinking must be true or false"):
            model_thinks_by_default(bad)
    for bad in (0, -5, 2.5, True, "256"):
        with pytest.raises(ConfigError, match="max_new_tokens must be a positive integer"):
            model_max_tokens({"max_new_tokens": bad}, 4096)


def test_the_demo_declares_no_thinking_and_short_answers(demo_home):
    config = json.loads((demo_home / "generation_config.json").read_text())
    assert config["enable_thinking"] is False and 100 <= config["max_new_tokens"] <= 512


def _prompt_tokens(demo_home, *flags) -> int:
    args = ["generate", str(demo_home), "-p", "hello", "-n", "1", "--json", *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.splitlines()[-1])["stats"]["prompt_tokens"]


def test_generate_renders_the_demo_prompt_without_thinking(demo_home):
    default, off, on = (_prompt_tokens(demo_home, *f) for f in ((), ("--no-think",), ("--think",)))
    # Thinking off closes an empty <think></think> block in the prompt: more tokens than thinking on.
    assert default == off and off != on


def test_chat_takes_the_models_defaults_and_flags_override(demo_home, monkeypatch):
    seen = []
    monkeypatch.setattr(chat_command._ChatLoop, "run", lambda self: seen.append(self.session))
    for flags, thinking, max_tokens in [
        ((), False, 256),
        (("--think",), True, 256),
        (("-n", "40"), False, 40),
    ]:
        result = CliRunner().invoke(main, ["chat", str(demo_home), *flags], input="")
        assert result.exit_code == 0, result.output
        session = seen.pop()
        assert (session.enable_thinking, session.max_tokens) == (thinking, max_tokens), flags


def test_serve_settings_follow_the_model_unless_flags_say(demo_home):
    with load_engine(demo_home) as engine:
        s = _settings(ServeConfig(model_names=("demo",)), engine)
        assert (s.thinking, s.default_max_tokens) == (False, 256)
        s = _settings(ServeConfig(model_names=("demo",), thinking=True, default_max_tokens=99), engine)
        assert (s.thinking, s.default_max_tokens) == (True, 99)
        engine.tokenizer.generation_config = {}  # a Qwen3.5 checkpoint sets neither key
        s = _settings(ServeConfig(model_names=("demo",)), engine)
        assert (s.thinking, s.default_max_tokens) == (True, 4096)
