import sys

from cefmp4.cli import main

sys.exit(main())
