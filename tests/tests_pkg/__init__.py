"""Modules the tests import side networks from by path (``tests.tests_pkg.heads.MyHead``)."""
