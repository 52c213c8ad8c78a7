"""`streamer chat`: talk to a model in the terminal (or through a pipe, one message per line).

The answer streams to stdout as it is generated: thinking dimmed (on a terminal) or hidden, the answer
plain. Everything else (stats lines, command replies, progress) goes to stderr, so a script can read
the answers from stdout. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys

import click

from streamer.cli.options import sampling_options, with_runtime
from streamer.cli.pipeline import open_engine_for_rank, pipeline_options, rank_lines
from streamer.errors import StreamerError
from streamer.generation.chat_session import DEFAULT_MAX_TOKENS, ChatChunk, ChatSession, TurnStats
from streamer.generation.generate import PREFILL_CHUNK
from streamer.generation.sampling import default_sampling_params, model_max_tokens, model_thinks_by_default
from streamer.loader import describe_routing
from streamer.storage.packed_format import pruned_label
from streamer.storage.session import list_sessions, read_session, session_path, write_session

DIM, RESET = "\x1b[2m", "\x1b[0m"
PROMPT, CONTINUE = ">>> ", "... "
HELP = """commands:
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (/system alone removes it)
  /save NAME     save the conversation and model state as session NAME
  /load NAME     continue session NAME (/load alone lists the saved ones)
  /stats         totals for this session: tokens, speed, expert cache hit rate, GB read
  /help          this list
  /quit          exit (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during an answer stops it. Start a message with // to send a line that begins with /.
On a terminal, end a line with \\ to continue the message on the next, or wrap it in \"\"\" ... \"\"\"."""
COMMANDS = ("/reset", "/system", "/save", "/load", "/stats", "/help", "/quit")
# On a terminal, control characters the model writes (ESC above all) are shown as symbols, not obeyed.
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {0x7F: 0x2421}
_VISIBLE |= {c: 0xFFFD for c in range(0x80, 0xA0)}


@click.command()
@click.argument("model", required=False)
@click.option("--system", help="System prompt.")
@click.option(
    "--think/--no-think",
    default=None,
    help="Think before answering, or not (Qwen3.5's non-thinking mode). Default: the model's own "
    "(generation_config.json; Qwen3.5 thinks, the demo does not).",
)
@click.option("--hide-thinking", is_flag=True, help="Let the model think but do not show the thinking.")
@click.option(
    "--max-tokens",
    "-n",
    type=click.IntRange(min=1),
    default=None,
    help=f"Most tokens per answer, thinking included [default: the model's max_new_tokens, else "
    f"{DEFAULT_MAX_TOKENS}].",
)
@click.option(
    "--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Seed for sampling (reproducible runs)."
)
@sampling_options()
@pipeline_options
@with_runtime
def chat(
    model, system, think, hide_thinking, max_tokens, seed, sampling_overrides, runtime, resident, pipeline,
):  # fmt: skip
    """Chat with MODEL (a packed model, a hub id packed before, or the demo when omitted).

    Sampling defaults come from the model's generation_config.json, else from Qwen3.5's model card
    (thinking: temp 0.6, top-p 0.95, top-k 20; --no-think: temp 0.7, top-p 0.8, top-k 20, presence
    penalty 1.5); each flag overrides one value. Piped stdin is read as one message per line.

    \b
    Examples:
      streamer chat mlx-community/Qwen3.5-35B-A3B-4bit
      echo "Why is the sky blue?" | streamer chat ./packed --no-think --temp 0
    """
    overrides = {**sampling_overrides, "seed": seed}
    with open_engine_for_rank(model, runtime, resident, pipeline) as engine:
        model_config = engine.tokenizer.generation_config
        thinking = model_thinks_by_default(model_config) if think is None else think
        defaults = default_sampling_params(model_config, thinking=thinking)
        params = dataclasses.replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
        max_tokens = max_tokens or model_max_tokens(model_config, DEFAULT_MAX_TOKENS)
        session = ChatSession(engine, params, system=system, enable_thinking=thinking, max_tokens=max_tokens)
        _ChatLoop(session, hide_thinking).run()


class _StopOnInterrupt:
    """While an answer runs: the first Ctrl-C asks it to stop, a second one interrupts at once."""

    def __init__(self, session: ChatSession):
        self._session = session
        self._pressed = False

    def __enter__(self) -> _StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self._pressed:
            raise KeyboardInterrupt
        self._pressed = True
        self._session.stop()


class _ChatLoop:
    """Reads lines, runs commands or turns, prints answers (stdout) and everything else (stderr)."""

    def __init__(self, session: ChatSession, hide_thinking: bool):
        self.session = session
        self.hide_thinking = hide_thinking
        self.interactive = sys.stdin.isatty()
        self.tty = sys.stdout.isatty()
        self.color = self.tty and not os.environ.get("NO_COLOR")  # https://no-color.org
        self._stderr_tty = sys.stderr.isatty()
        session.prefill_progress = self._progress
        self._shown = ""  # kind of the text printed last in this answer
        self._last_char = "\n"

    def run(self) -> None:
        if self.interactive:
            # A shell that starts a program in the background hands it SIGINT ignored, and Python then
            # leaves it ignored: a chat on a terminal always takes Ctrl-C.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            self._note(self._banner())
        elif self.session.engine.routing.get("mode") != "exact":
            self._note(describe_routing(self.session.engine.routing))  # piped: no banner, still labelled
        while True:
            try:
                line = self._read()
            except (EOFError, KeyboardInterrupt):
                if self.interactive:
                    click.echo()
                return
            if line is None or not line.strip():
                continue
            if line.startswith("//"):
                line = line[1:]
            elif line.startswith("/"):
                if self._command(line.strip()) == "quit":
                    return
                continue
            with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C just after an answer ended
                self._answer(line)

    # ---- input --------------------------------------------------------------------------------------

    def _read(self) -> str | None:
        """One message without its newline; None when it could not be decoded (already reported)."""
        if self.interactive:
            try:
                return self._read_typed()
            except UnicodeError:
                self._note("that line is not valid UTF-8; it was ignored (check the terminal's encoding)")
                return None
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise EOFError
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            self._note(f"input line is not valid UTF-8 ({e.reason} at byte {e.start}); it was ignored")
            return None

    def _read_typed(self) -> str:
        """A typed message: one line, lines joined by a trailing backslash, or a \"\"\" ... \"\"\" block."""
        lines = [_checked(input(PROMPT))]
        if lines[0].startswith('"""'):
            lines[0] = lines[0][3:]
            while not lines[-1].endswith('"""'):
                lines.append(_checked(input(CONTINUE)))
            lines[-1] = lines[-1][:-3]
            return "\n".join(lines).strip("\n")
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(_checked(input(CONTINUE)))
        return "\n".join(lines)

    # ---- commands -----------------------------------------------------------------------------------

    def _command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            self._note(HELP)
        elif name == "/reset":
            s.reset()
            self._note("conversation cleared" + (" (system prompt kept)" if s.system else ""))
        elif name == "/system":
            s.set_system(arg or None)
            self._note("system prompt set" if arg else "system prompt removed")
        elif name == "/stats":
            totals = self.session.totals()  # one gathering of stats (around every rank of a pipeline)
            self._note(self._totals_line(totals))
            for line in rank_lines(totals["ranks"]):
                self._note("  " + line)
        elif name in ("/save", "/load"):
            self._session_command(name, arg)
        else:
            self._note(f"unknown command {name}; commands: {' '.join(COMMANDS)} (/help explains them)")
        return None

    def _session_command(self, name: str, arg: str) -> None:
        if not arg:
            if name == "/save":
                self._note("usage: /save NAME")
            else:
                saved = list_sessions()
                self._note("usage: /load NAME; saved sessions: " + (", ".join(saved) or "none"))
            return
        try:
            path = session_path(arg)
            if name == "/save":
                size = write_session(path, self.session.export_state())
                self._note(f"saved session {arg} ({size / 1e6:.1f} MB) to {path}")
            else:
                self.session.import_state(read_session(path), source=f"session {arg} ({path})")
                users = sum(m["role"] == "user" for m in self.session.messages)
                self._note(
                    f"loaded session {arg}: {users} messages from you, "
                    f"{len(self.session.cached_ids)} tokens of model state"
                )
        except (StreamerError, OSError) as e:
            self._note(str(e))

    # ---- answers ------------------------------------------------------------------------------------

    def _answer(self, text: str) -> None:
        self._shown, self._last_char = "", "\n"
        error, turns = None, len(self.session.turns)
        with _StopOnInterrupt(self.session):
            try:
                with contextlib.closing(self.session.send(text)) as chunks:
                    for chunk in chunks:
                        self._show(chunk)
            except KeyboardInterrupt:
                pass  # the session has already recovered a consistent state
            except StreamerError as e:
                error = e
            finally:
                self._end_answer()
        if error:
            self._note(f"error: {error}")
        if len(self.session.turns) > turns:
            self._note(self._turn_line(self.session.turns[-1]))

    def _show(self, chunk: ChatChunk) -> None:
        if chunk.kind == "thinking" and self.hide_thinking:
            return
        out = []
        if chunk.kind != self._shown:
            out.append(self._switch(chunk.kind))
            self._shown = chunk.kind
        out.append(chunk.text.translate(_VISIBLE) if self.tty else chunk.text)
        text = "".join(out)
        sys.stdout.write(text)
        sys.stdout.flush()
        self._last_char = text[-1]

    def _switch(self, kind: str) -> str:
        """Text that ends the previous part and opens ``kind``: ANSI dim on a terminal, tags elsewhere."""
        if kind == "thinking":
            return DIM if self.color else "<think>\n"
        if not self._shown:
            return ""
        sep = "" if self._last_char == "\n" else "\n"
        return (RESET + sep + "\n") if self.color else (sep + "</think>\n\n")

    def _end_answer(self) -> None:
        tail = ""
        if self._shown == "thinking" and self.color:
            tail = RESET
        elif self._shown == "thinking":
            tail = ("" if self._last_char == "\n" else "\n") + "</think>"
            self._last_char = ">"
        if self._last_char != "\n" or not self._shown:
            tail += "\n"
        sys.stdout.write(tail)
        sys.stdout.flush()

    # ---- stderr lines -------------------------------------------------------------------------------

    def _progress(self, done: int, total: int) -> None:
        if total <= PREFILL_CHUNK:
            return
        end = "\r" if self._stderr_tty else "\n"
        click.echo(f"prefill {done}/{total} tokens ({100 * done / total:.0f}%)", err=True, nl=False)
        click.echo(end, err=True, nl=False)
        if done == total and self._stderr_tty:
            click.echo("\x1b[2K", err=True, nl=False)

    def _turn_line(self, t: TurnStats) -> str:
        stopped = {"length": " (stopped: --max-tokens)", "interrupted": " (interrupted)"}.get(
            t.finish_reason, ""
        )
        parts = [
            f"{t.generated_tokens} tokens, {t.decode_tps:.1f} tok/s{stopped}",
            f"prompt {t.prompt_tokens} tokens, {t.prefilled_tokens} new, {t.prefill_tps:.0f} tok/s",
        ]
        parts += self._expert_parts(t.expert)
        return "[" + " | ".join(parts) + "]"

    def _totals_line(self, tot: dict) -> str:
        parts = [
            f"{tot['turns']} turn{'' if tot['turns'] == 1 else 's'}",
            f"generated {tot['generated_tokens']} tokens, "
            f"{tot['generated_tokens'] / max(tot['decode_s'], 1e-9):.1f} tok/s",
            f"prefilled {tot['prefilled_tokens']} tokens, "
            f"{tot['prefilled_tokens'] / max(tot['prefill_s'], 1e-9):.0f} tok/s",
            f"{len(self.session.cached_ids)} tokens in context",
        ]
        parts += self._expert_parts(tot["expert"])
        if tot["cache_bytes"]:
            parts.append(f"expert cache {tot['cache_bytes'] / 1e9:.2f} GB")
        if self.session.engine.routing.get("mode") != "exact":
            parts.append(describe_routing(self.session.engine.routing, short=True))
        return " | ".join(parts)

    @staticmethod
    def _expert_parts(e: dict) -> list[str]:
        if "cache_hits" not in e:
            return []  # experts resident: no cache, no reads
        looked = e["cache_hits"] + e["cache_misses"]
        rate = f"{100 * e['cache_hits'] / looked:.1f}%" if looked else "n/a"
        return [f"cache hit rate {rate}", f"{e['bytes_read'] / 1e9:.3f} GB read"]

    def _banner(self) -> str:
        s = self.session
        p = s.params
        mode = "thinking" if s.enable_thinking else "no thinking"
        sampling = "greedy" if p.greedy else f"temp {p.temperature:g}, top-p {p.top_p:g}, top-k {p.top_k}"
        if p.presence_penalty:
            sampling += f", presence {p.presence_penalty:g}"
        if p.repetition_penalty != 1:
            sampling += f", repetition {p.repetition_penalty:g}"
        runtime = s.engine.runtime
        pruned = pruned_label(runtime.packed.manifest) if runtime is not None else None
        return (
            f"chatting with {s.engine.path.name} ({mode}; {sampling}; {describe_routing(s.engine.routing)}). "
            + (f"{pruned[0].upper()}{pruned[1:]}. " if pruned else "")
            + "/help for commands, Ctrl-C stops an answer, Ctrl-D exits."
        )

    def _note(self, text: str) -> None:
        click.echo(text, err=True)


def _checked(line: str) -> str:
    line.encode("utf-8")  # lone surrogates when the terminal sent bytes that are not UTF-8
    return line
