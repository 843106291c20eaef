"""``python -m vlcompress``."""

import sys

from vlcompress.cli import main

sys.exit(main())
