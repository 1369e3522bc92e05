"""Graph passes: turn the export form (float semantics) into the deploy form (bit-packed)."""
