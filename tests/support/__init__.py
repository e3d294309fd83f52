"""Helpers shared by the test suite (servers, ports)."""
