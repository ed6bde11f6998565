"""``cryo server``: the Backup Storage API (2018-04-10) over HTTP, on the embedded engine.

AWS shut the service down in 2024; cryo serves it itself, over the same
``LocalBackend`` the embedded repository uses, so both behave alike by
construction. Modules:

* ``routes``: the route table and one handler per operation.
* ``sigv4``: signature verification.
* ``credentials``: the access keys the server accepts.
* ``http``: connections, request framing, replies, the worker pool.
* ``log``: the access log (text or JSON).
* ``app``: settings, listen address, signals.

**Routing.** The raw request path is split on literal ``/`` before any
percent-decoding, and literal segments are compared as sent; only then is
each label percent-decoded to UTF-8. An object named ``x/complete`` travels
as ``x%2Fcomplete`` and stays one segment, so it can never be taken for
NotifyObjectComplete. Query strings are decoded the same way (``+`` stays a
plus sign). Status codes and error bodies are the model's: the error code in
``x-amzn-ErrorType``, a JSON body with ``Message`` (and ``Checksum`` /
``ChecksumAlgorithm`` for DataAlreadyExistsException), so botocore raises the
modeled exception classes. Malformed input is an IllegalArgumentException,
never a 500.

**Authentication.** Every request, job API included, carries a SigV4
signature (signing name ``backup-storage``, the server's region), recomputed
from the request as it arrived and compared in constant time (see
``sigv4``). ``UNSIGNED-PAYLOAD`` is accepted for PutChunk, PutObject and
NotifyObjectComplete only, as their ``authtype`` says; every other body is
hashed and checked. Missing, malformed, unknown-key, bad-signature and
clock-skewed (over 15 minutes) requests get AccessDeniedException. A job
belongs to the access key that created it; other keys get
AccessDeniedException on it. Secrets never reach the log.

**Guarantees.** Bodies stream from the socket to the chunk store in pieces
of at most 1 MiB, so memory does not grow with the size or number of
uploads; a worker pool bounds the threads. On SIGTERM the server stops
accepting, lets requests in progress finish, and exits 0; the engine makes
an object visible only once its upload is complete, so nothing half-written
ever shows. Each access key may have a bounded number of requests in
progress (ThrottlingException beyond it).
"""

from cryo.server.app import ServerConfig, run

__all__ = ["ServerConfig", "run"]
