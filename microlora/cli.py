"""The ``microlora`` command line: noun groups with verbs beneath, help from docstrings.

Each command lives in ``microlora/commands/``; this module only builds the root group and turns
``MicroloraError`` into a one-line ``click`` error with a non-zero exit code.
"""

from __future__ import annotations

import logging
import os

import click

from microlora import __version__
from microlora.core.errors import MicroloraError
from microlora.core.paths import HOME_ENV


class _Group(click.Group):
    """A group whose commands report user errors as one clean line, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MicroloraError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="microlora")
@click.option("--home", envvar=HOME_ENV, type=click.Path(file_okay=False),
              help=f"Cache directory for converted models [env {HOME_ENV}; "
                   "default ~/.cache/microlora].")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def cli(home: str | None, verbose: int) -> None:
    """microlora: turn documents into tiny LoRA adapters and compose them per question.

    \b
    Start with:
      microlora quickstart                    compile a tiny corpus, answer from it
      microlora compile DOCS --store DIR      compile documents into adapters
      microlora ask "QUESTION" --store DIR    answer from composed adapters
      microlora store stats --store DIR       inspect a store
      microlora serve --store DIR             OpenAI-compatible server (keys: microlora keys)
      microlora doctor                        check the default base model and embedder
    """
    if home:
        os.environ[HOME_ENV] = home  # the library reads the cache dir from the environment
    # transformers' per-load "Loading weights" bars are noise here; microlora shows its own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from microlora.commands import (
        ask,
        compile,
        doctor,
        eval,
        interop,
        quickstart,
        reader,
        serve,
        store,
    )

    cli.add_command(quickstart.quickstart)
    cli.add_command(ask.ask_command)
    cli.add_command(compile.compile_command)
    cli.add_command(eval.eval_command)
    cli.add_command(doctor.doctor)
    cli.add_command(store.store)
    cli.add_command(serve.serve_command)
    cli.add_command(serve.keys)
    cli.add_command(interop.export_command)
    cli.add_command(interop.import_command)
    cli.add_command(reader.reader)


_register()


def main() -> None:
    cli(prog_name="microlora")
