"""PyInstaller entry script for the one-file pistream executable (see packaging/pistream.spec)."""

from pistream.cli import entry

if __name__ == "__main__":
    entry()
