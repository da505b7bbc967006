import sys

from esh.cli import main

sys.exit(main())
