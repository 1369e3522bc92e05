"""Dataset readers and transforms behind ``bnnc.data`` (import the public API from ``bnnc.data``)."""
