import sys

from leanlm.cli import main

sys.exit(main())
