"""Front doors that turn wire traffic into pipeline calls."""
