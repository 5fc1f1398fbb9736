"""The end-to-end suite uses the whole-stack fixtures of tests/conftest.py (stack, client)."""
