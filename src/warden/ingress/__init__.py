"""Front doors that turn wire traffic into calls on the core (see :mod:`warden.ingress.base`)."""
