"""``python -m semlens`` runs the command-line tool (same as the ``semlens`` command)."""

from semlens.cli.main import main

if __name__ == "__main__":
    main()
