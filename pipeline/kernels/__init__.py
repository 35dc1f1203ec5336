"""Optional faster implementations of model pieces, registered by name and chosen at load (never by the model)."""
