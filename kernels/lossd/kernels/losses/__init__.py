"""Loss families; each module registers its functions on import."""
