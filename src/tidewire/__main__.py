"""`python -m tidewire`: the same as the `tidewire` command."""

from .cli import main

main()
