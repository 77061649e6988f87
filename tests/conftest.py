import os
import sys

# Tests import the project's top-level packages (datasets, engine, ...) from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
