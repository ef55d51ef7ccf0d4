"""Backbone registry, projection heads, momentum encoder and shuffle-BN, the key queue."""
