"""Fixtures of the `streamer serve` tests: a tiny synthetic packed model, a server that runs it and one
that answers from a script through the worker's test seam (tool calls and thinking, which a random
model never writes)."""

from __future__ import annotations

import pytest

from streamer.loader import load_engine
from streamer.serve.http import ServeConfig, start_server
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate
from tests.serve.helpers import Script


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = generate(root / "src", "tiny", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


@pytest.fixture(scope="module")
def server(packed):
    s = start_server(
        lambda: load_engine(packed), ServeConfig(port=0, model_names=("tiny",))
    ).start_background()
    yield s
    s.close()


@pytest.fixture(scope="module")
def scripted(packed):
    script = Script()
    s = start_server(lambda: load_engine(packed), ServeConfig(port=0, model_names=("tiny",)), scripted=script)
    script.tokenizer = s.worker.engine.tokenizer
    s.script = script
    s.start_background()
    yield s
    s.close()
