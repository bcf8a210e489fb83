"""``python -m jacfast``: see ``python -m jacfast --help``."""
import sys

from jacfast.cli import main

sys.exit(main())
