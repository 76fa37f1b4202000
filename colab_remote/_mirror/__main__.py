"""``python -m colab_remote._mirror --run-dir DIR``: the detached mirror process."""

import sys

from .main import main

sys.exit(main())
