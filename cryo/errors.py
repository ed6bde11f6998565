"""Errors: the Backup Storage API's modeled exceptions, and cryo's own.

Every backend raises the same classes, whether the failure happened
in-process (``LocalBackend``) or on a server (``RemoteBackend`` translates the
error code of the reply), so callers handle one set of exceptions. Each class
knows whether a retry can help (``retryable``); the retry wrapper and the
exit-code mapping read that flag and nothing else.
"""

from __future__ import annotations


class CryoError(Exception):
    """Base of every error cryo raises on purpose."""

    retryable = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StorageError(CryoError):
    """An error modeled by the Backup Storage API. ``code`` is the model's shape name."""

    code = "StorageError"
    http_status = 500


class IllegalArgumentException(StorageError):
    code = "IllegalArgumentException"
    http_status = 400


class ResourceNotFoundException(StorageError):
    code = "ResourceNotFoundException"
    http_status = 404


class AccessDeniedException(StorageError):
    code = "AccessDeniedException"
    http_status = 403


class DataAlreadyExistsException(StorageError):
    """The object exists and ThrowOnDuplicate was set; carries the existing object's checksum."""

    code = "DataAlreadyExistsException"
    http_status = 400

    def __init__(
        self, message: str = "", checksum: str | None = None, checksum_algorithm: str | None = None
    ) -> None:
        super().__init__(message)
        self.checksum = checksum
        self.checksum_algorithm = checksum_algorithm


class NotReadableInputStreamException(StorageError):
    code = "NotReadableInputStreamException"
    http_status = 400


class KMSInvalidKeyUsageException(StorageError):
    code = "KMSInvalidKeyUsageException"
    http_status = 400


class ThrottlingException(StorageError):
    code = "ThrottlingException"
    http_status = 429
    retryable = True


class RetryableException(StorageError):
    code = "RetryableException"
    http_status = 500
    retryable = True


class ServiceInternalException(StorageError):
    code = "ServiceInternalException"
    http_status = 500
    retryable = True


class ServiceUnavailableException(StorageError):
    code = "ServiceUnavailableException"
    http_status = 503
    retryable = True


#: Modeled error shapes by name.
MODELED: dict[str, type[StorageError]] = {
    cls.code: cls
    for cls in (
        IllegalArgumentException,
        ResourceNotFoundException,
        AccessDeniedException,
        DataAlreadyExistsException,
        NotReadableInputStreamException,
        KMSInvalidKeyUsageException,
        ThrottlingException,
        RetryableException,
        ServiceInternalException,
        ServiceUnavailableException,
    )
}


class EndpointUnreachable(CryoError):
    """The endpoint could not be reached (connection refused, reset, timed out)."""

    retryable = True


class RepositoryError(CryoError):
    """The local repository cannot be opened or is not a cryo repository."""


class RepositoryDamaged(CryoError):
    """The repository's catalog is damaged (SQLite found a malformed page): exit 1."""
