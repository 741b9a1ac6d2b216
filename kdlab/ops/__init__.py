"""Array operations kdlab implements itself (where XLA's own lowering is slow)."""
