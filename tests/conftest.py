import os
import sys
from pathlib import Path

# notebook kernels started by the tests inherit it: no profiler chatter in their outputs
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
