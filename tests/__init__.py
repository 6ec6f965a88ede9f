import os

# A program state change that programs.TRANSITIONS does not list raises in
# every test, daemons started by the tests included (they inherit it).
os.environ.setdefault("HIMBEERE_STRICT_STATES", "1")
