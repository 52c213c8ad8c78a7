"""`streamer chat` started with SIGINT ignored (a shell's background job, some CI runners) still exits on
Ctrl-C at the prompt.

Python keeps SIGINT ignored when it starts that way, so the chat installs its handler itself
(``_ChatLoop.run``). This is what made Ctrl-C at the prompt hang in CI-clone runs while it never failed
from an interactive shell: without that line the process below never exits.
"""

from __future__ import annotations

import signal

from tests.test_chat import Terminal, _exits_within, _wait_until_blocked_in_select, env, model  # noqa: F401


def test_ctrl_c_at_the_prompt_exits_when_started_with_sigint_ignored(model, env):  # noqa: F811
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child, as from a shell
    try:
        term = Terminal([str(model), "--temp", "0", "-n", "3"], env)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        term.expect(b">>> ")
        term.send(b"hi\n")
        term.expect(b">>> ", timeout=60)
        _wait_until_blocked_in_select(term.proc.pid)  # see test_chat: readline's prompt/select window
        term.interrupt()
        if not _exits_within(term.proc, 10):
            term.interrupt()
        assert term.close(timeout=20) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
