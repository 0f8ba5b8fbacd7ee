"""The admin API: bearer-token auth and the routes that change Warden's state."""
