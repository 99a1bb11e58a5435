"""Jobs: a queue in the database, leases + heartbeats, the worker loop, the fit job."""
