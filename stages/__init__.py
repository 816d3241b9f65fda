"""Thin entry points, one per stage: ``main(argv) -> int`` parses flags, calls the library."""
