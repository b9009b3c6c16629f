import sys

from muxserve.cli import main

sys.exit(main())
