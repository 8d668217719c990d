"""Phase 2: train the ladder side network from cached (or live) backbone states."""
