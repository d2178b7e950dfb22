"""The ``pinfer`` command line."""
