"""Phase 1: run the frozen backbone once and store its per-layer hidden states."""
