"""The `ndrelay` command: a click group; each subcommand lives in its own module.

- `serve`: the relay server (serve.py; demo streams in demo.py)
- `ls`, `info`, `rm`, `cat`: look at a relay's streams (streams.py)
- `record`, `play`, `push`: streams to files and back (recording.py)
- `produce`, `consume`: synthetic load and a rate meter (synthetic.py)

Client-side commands take `--url`/`NDRELAY_URL` and `--token`/`NDRELAY_TOKEN` (_connect.py)
and exit 0 when done, 1 on a relay error (one line on stderr), 2 on a usage error.

Client and server code is imported inside the commands, so `ndrelay --help` stays quick.
"""

from __future__ import annotations

import click

from .._version import __version__
from .recording import play, push, record
from .serve import serve
from .streams import cat, info, ls, rm
from .synthetic import consume, produce

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="ndrelay")
def main() -> None:
    """ndrelay: stream numpy arrays between machines over HTTP."""


for command in (serve, ls, info, cat, record, play, push, rm, produce, consume):
    main.add_command(command)


def _show_envvars(group: click.Group) -> None:
    """`--help` names the environment variable of every option that reads one."""
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                param.show_envvar = True
        if isinstance(command, click.Group):
            _show_envvars(command)


_show_envvars(main)
