"""The `ndrelay` command: a click group; each subcommand lives in its own module.

- `serve`: the relay server (serve.py; demo streams in demo.py)
- `produce`, `consume`: synthetic load and a rate meter (synthetic.py)

Client and server code is imported inside the commands, so `ndrelay --help` stays quick.
"""

from __future__ import annotations

import click

from .._version import __version__
from .serve import serve
from .synthetic import consume, produce

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="ndrelay")
def main() -> None:
    """ndrelay: stream numpy arrays between machines over HTTP."""


main.add_command(serve)
main.add_command(produce)
main.add_command(consume)


def _show_envvars(group: click.Group) -> None:
    """`--help` names the environment variable of every option that reads one."""
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                param.show_envvar = True
        if isinstance(command, click.Group):
            _show_envvars(command)


_show_envvars(main)
