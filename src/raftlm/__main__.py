import sys

from raftlm.cli import main

sys.exit(main())
