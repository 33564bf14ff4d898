"""`python -m ndrelay`: the `ndrelay` command."""

from ._cli import main

main()
