"""The service's domain errors: one tree with a single root, raised by every layer below the API.

    ServiceError                the root: a request the service refuses, with a message a person can act on
    ├── InvalidInput            the data sent is unusable (malformed file, unknown encoder, unfit data)
    ├── BadRequest              the request itself is malformed (a cursor, a multipart body)
    ├── Unauthorized            no API key, or an unknown one
    ├── NotFound                no such dataset, job or sample (or another tenant's)
    ├── Conflict                the request contradicts the resource's state (duplicate IDs, a job already running)
    ├── TooLarge                over a configured limit (upload bytes, items per request)
    ├── UnsupportedMediaType    not the content type the route reads
    └── InsufficientStorage     the data directory is full

Packages subclass these (``ingest.features.InputError(InvalidInput)``, ``statistics.FitError``,
``encoders.EncoderError``, ``jobs.queue.JobConflict(Conflict)``, ...). The API maps the branches
to HTTP status codes in one table (``service.api.errors``); the CLI prints the message and exits 2.
This module imports nothing, so every layer may raise these.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every error the service reports to its caller (never a bug)."""


class InvalidInput(ServiceError, ValueError):
    """The data sent cannot be used as it is."""


class BadRequest(ServiceError, ValueError):
    """The request is malformed (syntax, not content)."""


class Unauthorized(ServiceError):
    """Authentication is required and was not given, or the key is unknown."""


class NotFound(ServiceError, LookupError):
    """The resource does not exist for this caller."""

    def __init__(self, what: str = "dataset") -> None:
        super().__init__(f"{what} not found")


class Conflict(ServiceError):
    """The request contradicts the current state of the resource."""


class TooLarge(ServiceError):
    """The request exceeds a configured limit; the message names the limit and its setting."""


class UnsupportedMediaType(ServiceError):
    """The body is not of a content type the route reads."""


class InsufficientStorage(ServiceError):
    """The data directory has no room left for the request."""
