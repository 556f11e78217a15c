"""Loaded at start-up by tests/bin/python-without-transformers: `transformers` is not installed here."""

import sys


class _Hidden:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Hidden())
