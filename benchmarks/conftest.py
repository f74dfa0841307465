import pathlib
import sys

# The benchmark modules import their shared helpers as a sibling module.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
