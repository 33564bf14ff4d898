"""`python -m ndrelay`: the `ndrelay` command."""

from .cli import main

main()
