"""Stand-in for the few names of composer that MegaBlocks' test harness imports (conftest and
fixtures only; the tests themselves do not use it). Single process."""
__version__ = "0-shim"
