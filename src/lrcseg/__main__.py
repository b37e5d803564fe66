import sys

from lrcseg.cli import main

sys.exit(main())
