"""The ``streamer`` command group; each command lives in its own module of this package.

Commands parse flags, call one library function, and turn the library's exceptions into
``click.ClickException`` so a user mistake prints one clear line, never a traceback.
"""

from __future__ import annotations

import signal

# Ctrl-C at a prompt only works when the kernel delivers SIGINT to the main thread: readline sleeps in
# select() and wakes only for a signal delivered to it. Threads inherit the mask of the thread that
# starts them, so SIGINT is blocked while imports start library threads (OpenBLAS) and while models
# load (MLX's stream thread); `main` and `sigint_blocked` unblock it for the main thread again.
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import logging  # noqa: E402

import click  # noqa: E402

from streamer import __version__  # noqa: E402
from streamer.cli import bench as bench_commands  # noqa: E402
from streamer.cli import chat as chat_command  # noqa: E402
from streamer.cli import generate as generate_command  # noqa: E402
from streamer.cli import profile as profile_command  # noqa: E402
from streamer.cli import prune as prune_command  # noqa: E402
from streamer.cli import repack as repack_commands  # noqa: E402
from streamer.cli import serve as serve_command  # noqa: E402
from streamer.cli import synthetic as synthetic_command  # noqa: E402
from streamer.errors import StreamerError  # noqa: E402


class _Group(click.Group):
    """Turns expected errors from any command into a clean message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StreamerError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # the machine's refusal (permissions, disk full, I/O error): no traceback
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="streamer")
@click.option("-v", "--verbose", is_flag=True, help="Log what streamer is doing (to stderr).")
def main(verbose: bool) -> None:
    """Run mixture-of-experts models larger than memory by streaming experts from the SSD.

    \b
    Typical use:
      streamer repack mlx-community/Qwen3.5-397B-A17B-4bit   # once: lay out experts for streaming
      streamer chat mlx-community/Qwen3.5-397B-A17B-4bit     # then chat (or serve, generate, bench)

    With no model, chat uses a small embedded demo checkpoint.
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


# The commands, each defined in its own module; they never import this group (no import loop).
for _command in (
    repack_commands.repack,
    repack_commands.verify,
    repack_commands.info,
    repack_commands.list_models,
    chat_command.chat,
    serve_command.serve,
    generate_command.generate,
    bench_commands.bench,
    bench_commands.advise,
    profile_command.profile,
    prune_command.prune,
    synthetic_command.synthetic,
):
    main.add_command(_command)
