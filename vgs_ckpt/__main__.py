import sys

from vgs_ckpt.cli import main

sys.exit(main())
