"""The jewelclf CLI with the tests' tiny backbone registered, for subprocess tests.

``python tests/tiny_cli.py fit|tune ...`` behaves like ``jewelclf fit|tune ...``, except that the
``tiny_cnn`` backbone of ``tests/conftest.py`` exists (it is registered when conftest is imported).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jewelclf.cli import main  # noqa: E402

import conftest  # noqa: E402,F401  registers tiny_cnn

if __name__ == "__main__":
    main()
