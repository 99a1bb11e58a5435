"""The use cases behind the routes, one module per resource. Each takes the app's
:class:`~service.usecases.context.AppContext` and the caller's tenant, enforces the domain's rules,
raises domain errors (``service.errors``) and returns wire schemas (``service.schemas``). They
know nothing of HTTP: the API maps their errors to status codes in one table."""
